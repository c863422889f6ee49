"""The part of the training loop that owns ``output_dir``: its marker and lock, pickle-free checkpoints
(:mod:`lorakit.training.state`) with exact resume, their rotation, and what a diverged run says and keeps."""

from __future__ import annotations

import fcntl
import shutil
from pathlib import Path

from lorakit.fileio import write_json
from lorakit.logs import note, warn
from lorakit.outputs import claim_dir
from lorakit.training import state as S
from lorakit.training.run_dir import (
    LOOP_STATE_FILE,
    checkpoint_run,
    checkpoints,
    differing,
    run_config,
)


class TrainingDiverged(ValueError):
    """The loss became NaN or infinite; the message names the step and the last good checkpoint."""


class Checkpointing:
    """Mixed into :class:`lorakit.training.loop.TrainLoop`: needs ``cfg``, ``accelerator``, ``output_dir``,
    ``raw_models``, ``optimizer``, ``lr_scheduler``, ``run_id``, ``resume_path``, ``global_step`` and the
    checkpoint fields set by the loop's constructor."""

    # -- output folder: marker, lock, a fresh start
    def _claim_output(self) -> None:
        """Main process: mark output_dir as lorakit's, take its lock (a second run into it fails at once), and
        on ``overwrite=true`` remove the earlier run's checkpoints (lorakit wrote them)."""
        acc, cfg = self.accelerator, self.cfg
        if acc.is_main_process:
            claim_dir(self.output_dir, kind="training", flag="output_dir")
            lock = open(self.output_dir / ".lorakit.lock", "a+")
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                lock.close()
                raise ValueError(f"output_dir {self.output_dir} is in use by another lorakit run (its lock "
                                 f"{self.output_dir / '.lorakit.lock'} is held); wait for it or choose another "
                                 "output_dir") from None
            self._lock = lock
            root = self.output_dir / "checkpoints"
            if root.is_dir():
                for p in root.glob(".tmp-checkpoint-*"):  # a killed run's half-written checkpoint (we hold the lock)
                    shutil.rmtree(p, ignore_errors=True)
            if self.resume_path is None and cfg.overwrite and not cfg.resume:
                for _, p in checkpoints(self.output_dir):
                    if (p / LOOP_STATE_FILE).is_file():
                        shutil.rmtree(p)
        acc.wait_for_everyone()

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    # -- checkpoints (no pickle: lorakit.training.state)
    def _resume(self) -> None:
        cfg, acc = self.cfg, self.accelerator
        path = self.resume_path
        if path is None:
            if cfg.resume and str(cfg.resume) == "latest":
                note(f"lorakit: resume=latest but {self.output_dir / 'checkpoints'} has no checkpoint of this "
                     "run; starting at step 0")
            return
        ignored = S.check_folder(path)
        if ignored:
            note(f"lorakit: ignoring {', '.join(ignored)} in {path} (lorakit never loads pickle files)")
        info = S.read_loop_info(path)
        if info.get("run_id") not in (None, self.run_id):
            warn(f"{path} was made by a run with other settings "
                 f"({differing(info.get('config') or {}, run_config(cfg))}); continuing it as asked")
        if info.get("train_batch_size_global") not in (None, cfg.train_batch_size * acc.num_processes):
            warn(
                f"checkpoint was made with global batch {info['train_batch_size_global']}, "
                f"now {cfg.train_batch_size * acc.num_processes}; the data order will differ"
            )
        S.load_model_state(self.raw_models, self.optimizer, self.lr_scheduler, getattr(acc, "scaler", None), path)
        rank = acc.process_index
        if (path / f"rng-{rank}.json").is_file():
            S.load_rng_state(path, rank)
        else:
            warn(f"{path} has no random state for process {rank}; dropout draws will differ")
        self.global_step = int(info["global_step"])
        self.last_checkpoint = self.resumed_from = path
        note(f"lorakit: resumed from {path} at step {self.global_step}")

    def _check_weights(self) -> None:
        """Never save non-finite weights: stop naming the parameter and the last good checkpoint."""
        bad = S.nonfinite(self.raw_models)
        if bad is not None:
            self._diverged(f"trainable parameter {bad.split(':', 1)[1]} holds NaN/inf after step {self.global_step}")

    def _checkpoint(self) -> Path:
        acc, cfg = self.accelerator, self.cfg
        self._check_weights()
        root = self.output_dir / "checkpoints"
        final = root / f"checkpoint-{self.global_step}"
        tmp = root / f".tmp-checkpoint-{self.global_step}"
        if acc.is_main_process:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        if acc.is_main_process:
            S.save_model_state(self.raw_models, self.optimizer, self.lr_scheduler, getattr(acc, "scaler", None), tmp)
        S.save_rng_state(tmp, acc.process_index)
        acc.wait_for_everyone()
        if acc.is_main_process:
            # written last: a folder without it is incomplete and never resumed
            write_json({"format": S.FORMAT, "global_step": self.global_step, "run_id": self.run_id,
                        "config": run_config(cfg),
                        "train_batch_size_global": cfg.train_batch_size * acc.num_processes}, tmp / LOOP_STATE_FILE)
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
            self._rotate(root)
        acc.wait_for_everyone()
        self.last_checkpoint = self.pending_checkpoint = final
        return final

    def _rotate(self, root: Path) -> None:
        """Keep this run's newest ``checkpoints_total_limit`` checkpoints and always the last verified one;
        another run's checkpoints are never touched."""
        limit = self.cfg.checkpoints_total_limit
        if not limit:
            return
        own = [p for _, p in checkpoints(self.output_dir) if checkpoint_run(p)[0] == self.run_id]
        keep = set(own[-limit:]) | {self.good_checkpoint}
        if self.good_checkpoint is None:
            keep.add(self.resumed_from)  # until a newer one is known good
        for old in own:
            if old not in keep:
                shutil.rmtree(old, ignore_errors=True)

    def _verified(self) -> None:
        """The weights of the pending checkpoint just gave a finite loss: it is good."""
        if self.pending_checkpoint is not None:
            self.good_checkpoint, self.pending_checkpoint = self.pending_checkpoint, None
            if self.accelerator.is_main_process:
                self._rotate(self.output_dir / "checkpoints")

    def _diverged(self, what: str):
        """Stop: name the real last good checkpoint. A checkpoint whose weights led straight to this (written
        after the last finite loss) is renamed ``diverged-checkpoint-N`` so resume=latest never picks it."""
        cfg, acc = self.cfg, self.accelerator
        note = ""
        bad = self.pending_checkpoint
        if bad is not None and bad != self.resumed_from:
            moved = bad.with_name(f"diverged-{bad.name}")
            if acc.is_main_process and bad.exists():
                if moved.exists():
                    shutil.rmtree(moved)
                bad.rename(moved)
            note = f" ({bad.name} was written just before and renamed {moved.name})"
        if self.good_checkpoint is not None:
            where = str(self.good_checkpoint)
        elif self.resumed_from is not None:
            where = f"none known ({self.resumed_from}, resumed from, leads straight to this)"
        elif bad is not None:
            where = "none"
        elif cfg.checkpointing_steps:
            where = f"none yet (the first was due at step {cfg.checkpointing_steps})"
        else:
            where = "none (checkpointing_steps=0: set it to keep some)"
        self._release()
        raise TrainingDiverged(
            f"{what}: training stopped. Last good checkpoint: {where}{note}. "
            "Lower learning_rate, use bf16 instead of fp16, or check the data; resume with resume=<checkpoint>."
        )
