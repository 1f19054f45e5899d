"""The data-parallel trainer: N ranks reproduce one rank on the same global batches.

Each step every rank draws the same global batch (`BatchSchedule`: a permutation per
epoch from the seed), takes its contiguous slice (`shard_slice`; uneven or empty slices
are fine), runs forward and backward on it with the loss gradient divided by the
GLOBAL batch length, and the gradients are summed over ranks in buckets
(`GradientAllReduce`). Summed, the ranks' gradients are the one-process gradient of the
mean loss; synchronized BatchNormalization makes the forward pass match too. Weights
start identical (seeded build, then rank 0's broadcast), so every rank applies the same
update. Regularization gradients are added on rank 0 only, so the sum has them once.

`Trainer` is the object; `distbn.train.command.run` is what `distbn train` calls. Tools
build on `fit(callbacks=...)` (`distbn.train.callbacks`), the one training loop.
"""

from __future__ import annotations

import functools
import hashlib
import math
import sys
import time

import numpy as np

import distbn
from distbn import random as _random
from distbn.distribute import get_strategy
from distbn.faults import maybe_fail
from distbn.train import builder
from distbn.train import checkpoint as ckpt
from distbn.train.buckets import GradientAllReduce, broadcast_weights
from distbn.train.callbacks import CallbackList
from distbn.train.config import config_hash
from distbn.train.data import BatchSchedule, shard_slice
from distbn.train.losses import accuracy as _count_correct
from distbn.train.optimizers import clip_gradients
from distbn.train.precise_bn import ScheduleBatches, recompute_bn_statistics
from distbn.train.preemption import Preempted
from distbn.train.progress import make_progress
from distbn.train.rundir import MODEL_FILE, RunDir

__all__ = ["TrainingError", "Trainer"]


class TrainingError(RuntimeError):
    """A failure every rank detects at the same step: a non-finite loss or gradient norm
    (`train.on_nonfinite: raise`), or replicas whose weights drifted apart."""


def _quiet_overflow(method):
    """Run `method` without numpy's overflow/invalid warnings: non-finite values are the
    trainer's to report (once, collectively, naming the step); numpy's warnings from
    every rank would only come first."""
    @functools.wraps(method)
    def quiet(*args, **kwargs):
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            return method(*args, **kwargs)
    return quiet


class Trainer:
    """Trains a config's model on its data over a strategy's replicas.

    Construction is local work only (data, model, optimizer; no collective), so a
    caller can check collectively that every rank built before training. `fit()` and
    `evaluate()` are collective: every rank must call them.

    Args:
        config: a validated `Config`.
        strategy: the `Strategy` (default `get_strategy()`); its BatchNormalization
            layers are built inside `strategy.scope()`.
        run_dir: the run directory (rank 0 writes it), or None to write nothing.
        verbose: ranks other than 0 print their progress lines too; rank 0 prints the
            model summary.
        out: stream for progress lines and the summary (default sys.stdout).
        dataset: a `builder.Dataset` to use instead of loading the config's data.

    Attributes:
        model, optimizer, dataset, strategy, config: the pieces.
        step: optimizer steps taken.
        total_steps: steps `fit()` runs to.
        history: every metrics record (identical on every rank; rank 0 writes them).
    """

    def __init__(self, config, strategy=None, run_dir=None, verbose=False, out=None,
                 dataset=None):
        self.config = config
        self.strategy = strategy if strategy is not None else get_strategy()
        self.rank = self.strategy.replica_id
        self.world = self.strategy.num_replicas_in_sync
        self.verbose = bool(verbose)
        self.out = out
        if dataset is None:
            maybe_fail("data_load")
            dataset = builder.load_dataset(config)
        self.dataset = dataset
        t = config.train
        n_train = len(self.dataset.y_train)
        self.total_steps = builder.total_steps(config, n_train)
        self.batches = BatchSchedule(n_train, t.global_batch_size, config.seed, t.drop_last)
        self.model = builder.build_model(config, self.dataset.input_shape,
                                         self.dataset.num_classes, self.strategy)
        self.optimizer = builder.build_optimizer(t.optimizer, self.total_steps)
        self.loss_fn = builder.build_loss(t, self.dataset.num_classes, config.model.dtype)
        self.run_dir = RunDir(run_dir) if run_dir is not None and self.rank == 0 else None
        self.run_dir_path = None if run_dir is None else str(run_dir)
        self.step = 0
        self.history: list[dict] = []
        self._opened = False
        self._started = False
        self._window = np.zeros(3)  # this rank's [loss sum, correct, count] since last flush
        self._epoch_totals = np.zeros(3)  # global, since the current epoch began
        self._epoch = 0
        self._last = {}
        self.preemption = None  # a PreemptionFlag, checked at every step boundary
        self.resumed_from = None  # the step a checkpoint restored
        self.skipped_steps = 0  # steps skipped for non-finite values (on_nonfinite: skip_step)
        self._stop_signal = 0  # the stop signal every rank agreed on in the last step
        self._checked_steps_left = 0  # steps still to run in check mode

    # --- set-up ------------------------------------------------------------------------------
    def open_run_dir(self, resume_step=None) -> list[str]:
        """Rank 0: create the run directory and write config.yaml (local, not collective).

        Args:
            resume_step: the step a checkpoint will restore: metrics.jsonl keeps its
                records up to that step instead of starting empty.

        Returns:
            Names of a previous run's files that were removed.
        """
        self._opened = True
        if self.run_dir is None:
            return []
        removed = self.run_dir.create(keep_metrics_until=resume_step)
        self.run_dir.write_config(self.config)
        return removed

    def _start(self) -> None:
        if self._started:
            return
        if not self._opened:
            self.open_run_dir()
        n = self.config.strategy.check_steps
        if n and self.world > 1 and not self.strategy.check:
            # A mismatched collective (a rank-dependent branch, a shape that differs) shows
            # up in the first steps, and there check mode names it on every rank instead
            # of hanging or reducing garbage; afterwards it would cost an allgather per
            # collective. Every rank switches at the same point, so it stays consistent.
            self.strategy.set_check(True)
            self._checked_steps_left = n
        # Seeded builds agree already; the broadcast makes it true whatever a rank's
        # BLAS or initializer did, moving statistics included.
        broadcast_weights(self.strategy, self.model.weights)
        self._trainable = self.model.trainable_weights
        self.optimizer.build(self._trainable)
        self._reduce = GradientAllReduce(self.strategy, self._trainable)
        self._started = True

    # --- one step ----------------------------------------------------------------------------
    @_quiet_overflow
    def train_step(self) -> dict:
        """Run one optimizer step (collective).

        Non-finite values are decided by every rank together: the summed gradient norm
        is the same everywhere, and a non-finite local loss is shared through an
        all-reduce MAX (together with the preemption flag). Then every rank raises
        `TrainingError` naming the step and the first layer whose output was non-finite
        (`train.on_nonfinite: raise`), or skips the step (`skip_step`): no optimizer
        update, moving statistics put back, a warning, and the step counter advances.

        Returns:
            {"epoch", "learning_rate", "grad_norm"} of the step taken; this rank's
            "loss_sum" (the per-sample losses summed, without the regularization
            penalty), "correct" (predictions that match) and "samples" (its shard's
            length), local to the rank (sum them over ranks for the global batch's);
            and "skipped": True for a skipped step.
        """
        self._start()
        step = self.step
        epoch, _, indices = self.batches.batch_at(step)
        n_global = len(indices)
        local = indices[shard_slice(n_global, self.rank, self.world)]
        maybe_fail("data")
        x = self.dataset.x_train[local]
        y = self.dataset.y_train[local]
        skip = self.config.train.on_nonfinite == "skip_step"
        before = self._moving_statistics() if skip else None
        masks = getattr(self.dataset, "mask_train", None)
        mask = None if masks is None else masks[local]
        out = self.model(x, training=True, sample_ids=local, step=step, mask=mask)
        per_sample, dout = self.loss_fn(out, y)
        # d(mean over the GLOBAL batch): each rank's share, so the ranks' sum is exact.
        dout = dout / np.asarray(n_global, dtype=dout.dtype)
        self.model.backward(dout, regularization_scale=1.0 if self.rank == 0 else 0.0,
                            input_grad=False)
        self._reduce()
        clip = self.config.train.optimizer.global_clipnorm
        if clip is not None:
            norm = clip_gradients(self._trainable, clip)
        else:
            norm = math.sqrt(sum(float(np.sum(np.square(v.grad, dtype=np.float64)))
                                 for v in self._trainable if v.grad is not None))
        loss_sum = float(np.sum(per_sample))
        local_sums = {"loss_sum": loss_sum, "correct": _count_correct(out, y),
                      "samples": len(local)}
        # The summed gradients, so the norm, are identical on every rank; the loss is
        # local, so its flag goes through the step's one flag all-reduce.
        loss_bad = self._agree_step_flags(not math.isfinite(loss_sum))
        lr = self.optimizer.learning_rate
        if loss_bad or not math.isfinite(norm):
            text = self._nonfinite_report(step, epoch, norm, loss_sum, x, local)
            if not skip:
                raise TrainingError(
                    f"{text}: the loss diverged; lower train.optimizer.learning_rate, set "
                    "train.optimizer.global_clipnorm, or set train.on_nonfinite: skip_step")
            for var, value in before:
                var.assign(value)
            self.step += 1
            self.skipped_steps += 1
            if self.rank == 0:
                print(f"[rank 0] warning: {text}; step skipped (train.on_nonfinite: "
                      "skip_step): no optimizer update, moving statistics restored",
                      file=sys.stderr, flush=True)
            self._last = {"epoch": epoch, "learning_rate": lr, "grad_norm": norm}
            self._after_step()
            return dict(self._last, **local_sums, skipped=True)
        self.optimizer.apply(self._trainable)
        self.step += 1
        self._window += (loss_sum, local_sums["correct"], len(local))
        self._last = {"epoch": epoch, "learning_rate": lr, "grad_norm": norm}
        self._after_step()
        return dict(self._last, **local_sums)

    def _after_step(self) -> None:
        """Step-boundary switches, at the same step on every rank."""
        if self._checked_steps_left:
            self._checked_steps_left -= 1
            if not self._checked_steps_left:
                self.strategy.set_check(False)

    def _agree_step_flags(self, loss_bad: bool) -> bool:
        """One int64 all-reduce MAX of [stop signal, local loss non-finite]: whether any
        rank's loss was non-finite; the agreed stop signal (or ORPHANED, a rank whose
        launcher exited) is kept for the step's end."""
        signum = 0 if self.preemption is None else self.preemption.pending()
        if self.world == 1:
            self._stop_signal = signum
            return loss_bad
        flags = np.array([signum, int(loss_bad)], dtype=np.int64)
        self.strategy.all_reduce(flags, op="max", name="train.step_flags")
        self._stop_signal = int(flags[0])
        return bool(flags[1])

    def _moving_statistics(self) -> list:
        """`(variable, copy of its value)` for every non-trainable weight (BN statistics)."""
        return [(v, v.numpy()) for v in self.model.non_trainable_weights]

    def _nonfinite_report(self, step, epoch, norm, loss_sum, x, local) -> str:
        """Say what was non-finite at `step` and where it started (collective, rare).

        Replays the step's forward pass layer by layer on every rank (the same batches,
        so synchronized layers make the same collectives), notes the first layer whose
        output is non-finite, then puts the moving statistics back as they were.
        """
        saved = self._moving_statistics()
        first = None
        try:
            with np.errstate(all="ignore"):
                masks = getattr(self.dataset, "mask_train", None)
                mask = None if masks is None else masks[local]
                outputs = self.model.layer_outputs(x, training=True, sample_ids=local,
                                                   step=step, mask=mask)
                for layer, h in outputs:
                    # Every layer runs on every rank (synchronized ones communicate).
                    if first is None and not np.all(np.isfinite(h)):
                        first = (self.model.layers.index(layer), layer.name)
        finally:
            for var, value in saved:
                var.assign(value)
        found = self.strategy.allgather_object((first, math.isfinite(loss_sum)),
                                               name="train.nonfinite")
        what = []
        if not math.isfinite(norm):
            what.append(f"gradient norm ({norm})")
        bad_loss = [r for r, (_, ok) in enumerate(found) if not ok]
        if bad_loss:
            what.append(f"loss on rank(s) {bad_loss}")
        text = f"non-finite {' and '.join(what)} at step {step + 1} (epoch {epoch})"
        layers: dict = {}
        for r, (where, _) in enumerate(found):
            if where is not None:
                layers.setdefault(where, []).append(r)
        if layers:
            text += "; first non-finite layer output: " + "; ".join(
                f"{name!r} (layer {i}) on rank(s) {ranks}"
                for (i, name), ranks in sorted(layers.items()))
        else:
            text += "; every layer's output was finite (the backward pass overflowed)"
        return text

    def check_replicas(self) -> None:
        """Compare every parameter and synchronized moving statistic across replicas
        (collective: one allgather of SHA-256 digests).

        Replica-local BN statistics differ by design and are left out.

        Raises:
            TrainingError: on every rank, naming the ranks that differ from rank 0 and
                the first tensor that does.
        """
        if self.world == 1:
            return
        local_only = {id(v) for v in self._unsynced_bn_statistics()}
        named = [(key, w) for key, w in self.model.named_weights().items()
                 if id(w) not in local_only]
        digests = [hashlib.sha256(np.ascontiguousarray(w.value).tobytes()).hexdigest()[:16]
                   for _, w in named]
        every = self.strategy.allgather_object(digests, name="train.replica_check")
        odd = [r for r, d in enumerate(every) if d != every[0]]
        if not odd:
            return
        first = next(i for i in range(len(named)) if any(every[r][i] != every[0][i]
                                                          for r in odd))
        raise TrainingError(
            f"replica check at step {self.step}: rank(s) {odd} hold weights that differ "
            f"from rank 0's, first {named[first][0]!r}; the replicas drifted apart (a "
            "collective, a rank-dependent computation or the hardware corrupted them)")

    def _flush(self) -> np.ndarray:
        """All-reduce the window's [loss sum, correct, count]; add it to the epoch's."""
        window = self.strategy.all_reduce(self._window.copy(), op="sum", name="train.metrics")
        self._window[:] = 0
        self._epoch_totals += window
        return window

    # --- evaluation --------------------------------------------------------------------------
    def _unsynced_bn_statistics(self) -> list:
        """Moving statistics that differ between replicas: replica-local BN layers, or
        synchronized ones whose sync group is smaller than the world."""
        if self.world == 1:
            return []
        whole = self.strategy.sync_group_size == self.world
        out = []
        for layer in self.model.layers:
            if layer.has_moving_statistics and not (layer.synchronized and whole):
                out += [layer.moving_mean, layer.moving_variance]
        return out

    def _replica_means(self, variables) -> list[np.ndarray]:
        """The mean over replicas of each variable (one float64 all-reduce)."""
        if not variables:
            return []
        sizes = [v.value.size for v in variables]
        buf = np.concatenate([v.value.astype(np.float64).ravel() for v in variables])
        self.strategy.all_reduce(buf, op="sum", name="bn.moving_statistics")
        buf /= self.world
        parts = np.split(buf, np.cumsum(sizes)[:-1])
        return [p.reshape(v.shape) for p, v in zip(parts, variables, strict=True)]

    def average_bn_statistics(self) -> None:
        """Replace replica-local moving statistics by their mean over replicas (collective).

        What model.npz holds for `synchronized: false`: one model, not N.
        """
        stats = self._unsynced_bn_statistics()
        for var, mean in zip(stats, self._replica_means(stats), strict=True):
            var.assign(mean)

    def evaluate(self, split="test") -> dict:
        """Loss and accuracy on a split, sharded over ranks, in inference mode (collective).

        Replica-local moving statistics are averaged over replicas for the evaluation
        (and restored after), so every rank evaluates the model that would be saved.

        Args:
            split: "test" or "train".

        Returns:
            {"split", "step", "epoch", "loss", "accuracy", "samples"}; loss and accuracy
            are None for an empty split. The loss includes the regularization penalty.
        """
        if split not in ("test", "train"):
            raise ValueError(f"split must be 'test' or 'train', got {split!r}")
        self._start()
        x_all = getattr(self.dataset, f"x_{split}")
        y_all = getattr(self.dataset, f"y_{split}")
        part = shard_slice(len(y_all), self.rank, self.world)
        stats = self._unsynced_bn_statistics()
        saved = [v.numpy() for v in stats]
        for var, mean in zip(stats, self._replica_means(stats), strict=True):
            var.assign(mean)
        try:
            totals = np.zeros(3)
            chunk = max(self.config.train.global_batch_size, 256)
            for start in range(part.start, part.stop, chunk):
                stop = min(start + chunk, part.stop)
                masks = getattr(self.dataset, f"mask_{split}", None)
                out = self.model(x_all[start:stop], training=False,
                                 mask=None if masks is None else masks[start:stop])
                per_sample, _ = self.loss_fn(out, y_all[start:stop])
                totals += (float(np.sum(per_sample)), _count_correct(out, y_all[start:stop]),
                           stop - start)
        finally:
            for var, value in zip(stats, saved, strict=True):
                var.assign(value)
        self.strategy.all_reduce(totals, op="sum", name=f"eval.{split}")
        loss_sum, correct, count = totals
        record = {"split": split, "step": self.step, "epoch": self._epoch_of_last_step(),
                  "loss": None, "accuracy": None, "samples": int(count)}
        if count:
            record["loss"] = loss_sum / count + self.model.regularization_loss
            record["accuracy"] = correct / count
        return record

    def _epoch_of_last_step(self) -> int:
        return 0 if self.step == 0 else (self.step - 1) // self.batches.steps_per_epoch

    # --- the loop ----------------------------------------------------------------------------
    def _record(self, record) -> None:
        self.history.append(record)
        if self.run_dir is not None:
            self.run_dir.log(record)

    @_quiet_overflow
    def fit(self, callbacks=None) -> dict:
        """Train to `total_steps`, evaluating every `train.eval_every` steps and at the
        end; average replica-local BN statistics; save model.npz (collective).

        Args:
            callbacks: None or a list of `distbn.train.callbacks.Callback`s. Every rank
                calls their hooks in order: `on_train_begin` before the first step,
                `on_step_end(trainer, step, logs)` after each step (logs: what
                `train_step()` returned), `on_evaluate(trainer, step, metrics)` after
                each evaluation, `on_train_end(trainer, summary)` last; so a hook may
                make collectives.

        Returns:
            The summary: steps, epochs, train_loss/train_accuracy (running mean over
            the last epoch's steps), test_loss/test_accuracy, samples_per_sec (training
            only), wall_time, run_dir, model_file.
        """
        cfg = self.config
        callbacks = CallbackList(callbacks)
        self._start()
        first_step = self.step  # a resumed run starts past 0
        progress = make_progress(cfg.logging.progress, self.rank, self.total_steps,
                                 self.verbose, self.out)
        self._header()
        if self.resumed_from is not None and self.rank == 0:
            self._print(f"resumed from step {self.resumed_from}")
        every, eval_every = cfg.logging.every_steps, cfg.train.eval_every
        per_epoch = self.batches.steps_per_epoch
        start = time.perf_counter()
        window_start, window_samples = start, 0
        train_seconds = 0.0
        train_samples = 0
        test = None
        callbacks.on_train_begin(self)
        try:
            while self.step < self.total_steps:
                epoch, _, indices = self.batches.batch_at(self.step)
                if epoch != self._epoch:
                    self._epoch, self._epoch_totals[:] = epoch, 0
                logs = self.train_step()
                window_samples += len(indices)
                step = self.step
                last = step == self.total_steps
                epoch_end = step % per_epoch == 0
                stats = None
                if step % every == 0 or last or epoch_end:
                    window = self._flush()
                    if step % every == 0 or last:
                        now = time.perf_counter()
                        elapsed = now - window_start
                        train_seconds += elapsed
                        train_samples += window_samples
                        stats = self._train_record(window, window_samples / max(elapsed, 1e-9),
                                                   now - start)
                        self._record(stats)
                        window_start, window_samples = now, 0
                progress.step(step, stats)
                callbacks.on_step_end(self, step, logs)
                if eval_every and step % eval_every == 0 and not last:
                    test = self._eval_and_log(progress, start)
                    callbacks.on_evaluate(self, step, dict(test))
                    window_start = time.perf_counter()  # evaluation is not training time
                check_every = cfg.train.check_replicas_every
                if check_every and step % check_every == 0:
                    self.check_replicas()
                signum = self._stop_requested()
                if signum:
                    path = self.save_checkpoint()
                    raise Preempted(step, signum, path)
                if self._checkpoint_due(step, last, epoch_end):
                    path = self.save_checkpoint()
                    if path is not None:
                        progress.message(f"checkpoint step {step}: {path}")
            self.average_bn_statistics()
            test = self._eval_and_log(progress, start)
            callbacks.on_evaluate(self, self.step, dict(test))
        finally:
            progress.close()
        self._check_replicas_agree()
        model_file = None
        if self.run_dir is not None:
            model_file = self.run_dir.save_weights(self.model.get_weight_dict())
            self.run_dir.close()
        totals = self._epoch_totals
        summary = {
            "steps": self.step,
            "steps_this_run": self.step - first_step,
            "epochs": self.step / per_epoch,
            "train_loss": totals[0] / totals[2] + self.model.regularization_loss
            if totals[2] else None,
            "train_accuracy": totals[1] / totals[2] if totals[2] else None,
            "test_loss": test["loss"],
            "test_accuracy": test["accuracy"],
            "test_samples": test["samples"],
            "samples_per_sec": train_samples / train_seconds if train_seconds else None,
            "wall_time": time.perf_counter() - start,
            "run_dir": self.run_dir_path,
            "model_file": model_file,
        }
        self._print_summary(summary)
        self._warn_if_diverged()
        callbacks.on_train_end(self, summary)
        return summary

    def _warn_if_diverged(self) -> None:
        """A finite loss that ended well above where it started: say so (rank 0)."""
        train = [r for r in self.history if r.get("split") == "train"
                 and r.get("loss") is not None and math.isfinite(r["loss"])]
        if self.rank == 0 and len(train) >= 2 and train[-1]["loss"] > 2.0 * train[0]["loss"]:
            print(f"[rank 0] warning: the training loss grew from {train[0]['loss']:.4g} "
                  f"(step {train[0]['step']}) to {train[-1]['loss']:.4g} (step "
                  f"{train[-1]['step']}): training diverged; "
                  "lower train.optimizer.learning_rate or set "
                  "train.optimizer.global_clipnorm", file=sys.stderr, flush=True)

    # --- checkpoints and preemption -----------------------------------------------------------
    def _stop_requested(self) -> int:
        """The signal number if any rank caught a stop signal, else 0. Agreed in the last
        step's flag all-reduce, so every rank stops at the same step."""
        return self._stop_signal

    def _checkpoint_due(self, step, last, epoch_end) -> bool:
        c = self.config.checkpoint
        if not c.enabled:
            return False
        epoch_done = step // self.batches.steps_per_epoch
        return (last or bool(c.every_steps and step % c.every_steps == 0)
                or bool(c.every_epochs and epoch_end and epoch_done % c.every_epochs == 0))

    def save_checkpoint(self):
        """Write a checkpoint of the state after `self.step` (collective; rank 0 writes).

        Replica-local BN moving statistics: the weights hold their mean over replicas
        (`checkpoint.moving_stats: mean`) or rank 0's (`rank0`), and every replica's own
        values are stored beside them (group "replicas"), so that a resume at the same
        world size continues exactly.

        Returns:
            The checkpoint's directory on rank 0 (None elsewhere, or without a run dir).
        """
        self._start()
        weights = self.model.get_weight_dict()
        unsynced = self._unsynced_bn_statistics()
        replicas = {}
        if unsynced:
            mine = {v.path: v.numpy() for v in unsynced}
            for r, theirs in enumerate(self.strategy.allgather_object(
                    mine, name="checkpoint.replica_stats")):
                replicas.update({f"rank{r}/{k}": v for k, v in theirs.items()})
            if self.config.checkpoint.moving_stats == "mean":
                for var, mean in zip(unsynced, self._replica_means(unsynced), strict=True):
                    weights[var.path] = mean.astype(var.dtype)
        # Training sums not logged yet, summed over ranks: a resumed run logs the same.
        window = self.strategy.all_reduce(self._window.copy(), op="sum",
                                          name="checkpoint.window")
        if self.run_dir is None:
            return None
        epoch, position, _ = self.batches.batch_at(self.step)
        groups = {"weights": weights, "optimizer": self.optimizer.get_state(),
                  "progress": {"epoch_totals": self._epoch_totals.copy(), "window": window}}
        if replicas:
            groups["replicas"] = replicas
        manifest = {
            "epoch": epoch, "position_in_epoch": position,
            "steps_per_epoch": self.batches.steps_per_epoch,
            "data_order_seed": self.config.seed,
            "rng_state": _random.generator().bit_generator.state,
            "world_size": self.world, "config_hash": config_hash(self.config),
            "moving_stats": self.config.checkpoint.moving_stats,
            "distbn_version": distbn.__version__,
        }
        return str(ckpt.save_checkpoint(self.run_dir_path, self.step, groups, manifest,
                                        keep=self.config.checkpoint.keep))

    def checkpoint_problem(self, found) -> str | None:
        """Whether a checkpoint fits this model and optimizer (local, loads nothing).

        Used before the run directory is touched, so a misfit leaves it as it was.

        Returns:
            None when it fits, else a message naming the checkpoint and the tensor.
        """
        path, _, groups = found
        # Building the slots is local and idempotent (zeros; `_start` builds the same).
        self.optimizer.build(self.model.trainable_weights)
        before = (self.model.get_weight_dict(), self.optimizer.get_state())
        try:
            self.model.set_weight_dict(groups["weights"])
            self.optimizer.set_state(groups["optimizer"])
        except (KeyError, ValueError) as exc:
            return f"checkpoint {path} does not fit this model: {exc}"
        finally:
            self.model.set_weight_dict(before[0])
            self.optimizer.set_state(before[1])
        return None

    def restore(self, found) -> None:
        """Load a checkpoint found by rank 0 into every replica (collective).

        Args:
            found: on rank 0, `(path, manifest, groups)` from `checkpoint.latest_checkpoint`
                (or None: nothing to restore); ignored on the other ranks, which receive
                what rank 0 loaded.

        Raises:
            ValueError: on every rank, naming the tensor, when the checkpoint does not fit
                this model or optimizer; nothing is loaded then.
        """
        self._start()
        problem, info = None, None
        if self.rank == 0 and found is not None:
            path, meta, groups = found
            before = (self.model.get_weight_dict(), self.optimizer.get_state())
            try:
                self.model.set_weight_dict(groups["weights"])
                self.optimizer.set_state(groups["optimizer"])
            except (KeyError, ValueError) as exc:
                self.model.set_weight_dict(before[0])  # load nothing: put everything back
                self.optimizer.set_state(before[1])
                problem = f"checkpoint {path} does not fit this model: {exc}"
            else:
                # Changed settings were listed when the directory was checked
                # (command._take_over), from config.yaml.
                info = {"step": int(meta["step"]), "world_size": int(meta["world_size"]),
                        "rng_state": meta.get("rng_state"),
                        "progress": groups.get("progress", {}),
                        "replicas": groups.get("replicas", {}),
                        "optimizer": groups["optimizer"]}
        problem, info = self.strategy.broadcast_object((problem, info), root=0,
                                                       name="checkpoint.restore")
        if problem:
            raise ValueError(problem)
        if info is None:
            return
        broadcast_weights(self.strategy, self.model.weights)
        if self.rank != 0:
            self.optimizer.set_state(info["optimizer"])
        if info["world_size"] == self.world:  # each replica continues from its own values
            for var in self._unsynced_bn_statistics():
                key = f"rank{self.rank}/{var.path}"
                if key in info["replicas"]:
                    var.assign(info["replicas"][key])
        if info["rng_state"] is not None:
            _random.generator().bit_generator.state = info["rng_state"]
        self.step = info["step"]
        self._epoch = self._epoch_of_last_step()
        progress = info["progress"]
        if "epoch_totals" in progress:
            self._epoch_totals[:] = progress["epoch_totals"]
            self._window[:] = progress["window"] if self.rank == 0 else 0.0
        self.resumed_from = self.step

    def _train_record(self, window, samples_per_sec, wall) -> dict:
        loss_sum, correct, count = window
        return {
            "split": "train",
            "step": self.step,
            "epoch": self._last["epoch"],
            "loss": (loss_sum / count if count else float("nan"))
            + self.model.regularization_loss,
            "accuracy": correct / count if count else float("nan"),
            "learning_rate": self._last["learning_rate"],
            "grad_norm": self._last["grad_norm"],
            "samples_per_sec": samples_per_sec,
            "wall_time": wall,
        }

    def precise_bn(self, num_batches=None, progress=None) -> dict:
        """PreciseBN (collective): recompute every BN layer's moving statistics as the
        population statistics of the schedule's first `num_batches` global batches
        (default `train.precise_bn.batches`), each rank reading its shards; see
        `distbn.train.precise_bn`. They replace the moving averages, as detectron2's
        PreciseBN hook overwrites the running statistics: the evaluation, model.npz and
        the rest of training use them.

        Returns:
            `recompute_bn_statistics`' per-layer summary.
        """
        self._start()
        n = self.config.train.precise_bn.batches if num_batches is None else num_batches
        summary = recompute_bn_statistics(self.model, ScheduleBatches.from_trainer(self, n),
                                          n, self.strategy, progress)
        if progress is not None and summary:
            progress.message(
                f"precise_bn: {n} batches, {len(summary)} layer(s), max |change| moving_mean "
                f"{max(v['mean_change'] for v in summary.values()):.3g} moving_variance "
                f"{max(v['var_change'] for v in summary.values()):.3g}")
        return summary

    def _eval_and_log(self, progress, start) -> dict:
        if self.config.train.precise_bn.batches:
            self.precise_bn(progress=progress)
        record = self.evaluate("test")
        record["wall_time"] = time.perf_counter() - start
        self._record(record)
        if record["samples"]:
            progress.message(f"eval step {record['step']} test loss {record['loss']:.4f} "
                             f"acc {record['accuracy']:.4f} ({record['samples']} samples)")
        return record

    def _check_replicas_agree(self) -> None:
        """Warn (rank 0) if the replicas' final weights differ: a broken collective."""
        if self.world == 1:
            return
        digest = hashlib.sha256()
        for w in self.model.weights:
            digest.update(np.ascontiguousarray(w.value).tobytes())
        digests = self.strategy.allgather_object(digest.hexdigest(), name="train.weights_hash")
        odd = [r for r, d in enumerate(digests) if d != digests[0]]
        if odd and self.rank == 0:
            print(f"[rank 0] warning: final weights differ from rank 0's on rank(s) {odd}; "
                  "model.npz holds rank 0's", file=sys.stderr, flush=True)

    # --- console -----------------------------------------------------------------------------
    def _print(self, text) -> None:
        print(f"[rank {self.rank}] {text}", file=self.out or sys.stdout, flush=True)

    def _header(self) -> None:
        if self.rank != 0:
            return
        if self.config.logging.progress == "none":
            return
        cfg, d = self.config, self.dataset
        kind = type(self.strategy).__name__
        bn = [la for la in self.model.layers if la.has_moving_statistics]
        if bn and self.world > 1:
            sync = [la.synchronized for la in bn]
            how = ("synchronized" if all(sync) else "replica-local" if not any(sync)
                   else "mixed synchronized/replica-local")
            group = self.strategy.sync_group_size
            kind += f", {how} BN" + (f" (groups of {group})" if any(sync) and
                                     group < self.world else "")
        per_epoch = self.batches.steps_per_epoch
        self._print(f"{self.world} rank(s) ({kind}); {self.total_steps} steps "
                    f"({self.total_steps / per_epoch:.3g} epochs of {per_epoch}), global batch "
                    f"{cfg.train.global_batch_size}; {len(d.y_train)} train / {len(d.y_test)} "
                    f"test samples; {self.model.count_params():,} parameters; run dir "
                    f"{self.run_dir_path or '(none)'}")
        if self.verbose:
            print(self.model.summary(), file=self.out or sys.stdout, flush=True)
        per_replica = cfg.train.global_batch_size // self.world
        if self.world > 1 and per_replica <= 1 and any(not la.synchronized for la in bn):
            print(f"[rank 0] warning: replica-local BatchNormalization with "
                  f"{per_replica} sample(s) per replica (global batch "
                  f"{cfg.train.global_batch_size} over {self.world} ranks): its batch "
                  "statistics come from a single sample; use synchronized: true or a "
                  "larger train.global_batch_size", file=sys.stderr, flush=True)

    def _print_summary(self, s) -> None:
        if self.rank != 0:
            return

        def num(v, fmt):
            return "n/a" if v is None else format(v, fmt)

        if s["steps_this_run"] == s["steps"]:
            steps = f"{s['steps']} steps ({s['epochs']:.3g} epochs)"
        else:
            steps = (f"{s['steps_this_run']} steps (resumed at step "
                     f"{s['steps'] - s['steps_this_run']}; {s['steps']} steps, "
                     f"{s['epochs']:.3g} epochs in all)")
        self._print(f"done: {steps} in {s['wall_time']:.1f} s on {self.world} rank(s), "
                    f"{num(s['samples_per_sec'], '.0f')} samples/s")
        self._print(f"train loss {num(s['train_loss'], '.4f')} acc "
                    f"{num(s['train_accuracy'], '.4f')} (running mean over the last epoch)")
        self._print(f"test  loss {num(s['test_loss'], '.4f')} acc "
                    f"{num(s['test_accuracy'], '.4f')} ({s['test_samples']} samples)")
        if s["model_file"]:
            self._print(f"wrote {s['run_dir']}/{{config.yaml, metrics.jsonl, {MODEL_FILE}}}")
