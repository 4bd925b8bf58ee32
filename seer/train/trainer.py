"""The SwAV training loop (seer_spec.md 1.1): data -> forward -> loss -> backward -> freeze -> step ->
renormalise prototypes -> queue, with metrics, collapse warnings, checkpoints, evaluation and a plot.

    trainer = Trainer(cfg, out="runs/x")     # resumes from OUT/checkpoints when there is a checkpoint
    result = trainer.fit()                    # {'step', 'eval', 'plot', ...}

A step whose loss is NaN/inf (on any rank) is skipped on every rank: no update, no queue push, the head's
BatchNorm statistics put back, counted; ``train.max_nonfinite_steps`` such steps in a row stop the run with
:class:`NonFiniteLossError`, leaving the last checkpoint (whose weights are those from before the first bad step:
skipped steps change none) as the place to resume.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import logging
import math
import os
import signal
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from .. import config as C
from ..data import TrainData
from ..data.dataset import DataError
from ..data.exclude import skipped_line
from ..data.sampler import mix_seed
from ..data.sources import printable
from ..durable import sync_file, sync_folder, write_atomic
from ..model.init import local_tensor
from ..parallel import ParallelDims, get_rng_tracker, seed_parallel_rng
from ..parallel.dims import DTYPES
from ..swav import PrototypeFreezer, QueueShapeError, SwAVQueue, normalize_prototypes, swav_loss
from . import state as S
from .build import autocast_dtype, build_model, build_optimizer_and_schedule, clip_grad_norm, resolve_precision
from .checkpoint import (CheckpointManager, agreed_checkpoint, architecture_diffs, is_checkpoint_name,
                         list_checkpoints, load_rank_state, load_tensors, read_meta, read_saved_config,
                         run_checkpoint_dir)
from .collapse import CollapseMonitor, collapse_signals
from .distributed import all_reduce_sum, barrier, check_shared_folders, init_distributed
from .init_from import (NOT_SHAPING, check_init_architecture, init_path, load_init_weights, normalisation_changes,
                        not_shaping_changes, not_shaping_diffs, pos_resize, resolve_init_source, same_source)
from .lock import RunLock
from .metrics import MetricsWriter, peak_flops, read_metrics
from .modules import BackboneView, nvtx_range
from .plot import plot_metrics

log = logging.getLogger("seer.train")


class NonFiniteLossError(RuntimeError):
    pass


class Trainer:
    """One run in OUT (see the module doc). Collective: every process of a torchrun launch constructs one."""

    def __init__(self, cfg: C.RunConfig, out: str | Path):
        self.cfg = C.validate(cfg)
        self.out = Path(out)
        t = cfg.train
        self.dist = init_distributed(t.device)
        self.device = self.dist.device
        if t.threads:
            torch.set_num_threads(t.threads)
        self._locks: list[RunLock] = []
        self._log_file: Optional[str] = None
        try:
            self._setup(cfg)
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        """Unlock OUT (and checkpoint.dir) for other processes, and stop logging to OUT/train.log (fit does it
        when it ends; idempotent)."""
        for lock in self._locks:
            lock.release()
        if self._log_file is not None:
            _stop_logging_to_file(self._log_file)
            self._log_file = None

    def _setup(self, cfg: C.RunConfig) -> None:
        t = cfg.train
        ckpt_dir = Path(cfg.checkpoint.dir).expanduser() if cfg.checkpoint.dir else self.out / "checkpoints"
        folders = {"OUT": self.out, "checkpoint.dir": ckpt_dir} if cfg.checkpoint.dir else {"OUT": self.out}

        def main_setup():  # rank 0; before anything here writes, another live run on a folder refuses this one
            # The checkpoint folder is locked in its own right, also the default OUT/checkpoints: another run
            # may name it as its checkpoint.dir (whose start would remove this run's checkpoint in progress).
            for folder in (self.out, ckpt_dir):
                if folder.exists() and not folder.is_dir():  # mkdir's own error says 'File exists'
                    raise NotADirectoryError(errno.ENOTDIR, f"expected a folder for the run's "
                                             f"{'output' if folder == self.out else 'checkpoints'}, found a file",
                                             str(folder))
                folder.mkdir(parents=True, exist_ok=True)
            for folder in (self.out, ckpt_dir):
                self._locks.append(RunLock(folder))
            self._log_file = _log_to_file(self.out / "train.log")
        # Every rank sees the folders (and fails, not waits, where rank 0 could not set them up).
        check_shared_folders(folders, main_setup=main_setup if self.dist.is_main else None)
        self.dims = ParallelDims(cfg.parallel, self.device.type, self.dist.world)
        seed_parallel_rng(t.seed, self.dims)
        self.model = build_model(cfg, self.dims, self.device)
        # A training forward updates BatchNorm's running statistics (the head's) in place: a step skipped for a
        # non-finite loss puts them back, so that it changes nothing (NaN statistics would stay NaN for good).
        self._batch_norms = [m for m in self.model.modules()
                             if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
        self.backbone = BackboneView(self.model)
        self.opt, self.sched = build_optimizer_and_schedule(cfg, self.model, cfg.data.batch_size * self.dims.dp)
        self.freezer = PrototypeFreezer(self.model, cfg.loss.freeze_prototypes_iters)
        self.queue = SwAVQueue(cfg.loss.queue_length, cfg.head.output_dim, batch_size=cfg.data.batch_size,
                               crops_for_assign=cfg.loss.crops_for_assign, start_epoch=cfg.loss.queue_start_epoch,
                               world_size=self.dims.dp)
        self.precision = resolve_precision(t.precision, self.device)
        self.amp = autocast_dtype(self.precision)
        # Without autocast, FSDP (dp > 1) runs the blocks in parallel.param_dtype (bfloat16 by default), not float32.
        _check_attention_backend(cfg, self.device, self.amp,
                                 params=DTYPES[cfg.parallel.param_dtype] if self.dims.dp > 1 else None)
        self._evaluator = None
        if cfg.eval.at_end or cfg.eval.every:
            # eval.dataset is read now, before the data is indexed and the training runs: a wrong path or a
            # folder without class folders stopped the run only once training had finished.
            self.evaluator
        self.scaler = torch.amp.GradScaler(self.device.type) if self.precision == "fp16" else None
        self.data = TrainData(cfg.data, seed=t.seed, cache=self.out / "data", rank=self.dims.dp_rank,
                              world=self.dims.dp, device=self.device, barrier=barrier,
                              is_index_writer=self.dist.is_main)
        self.ckpt = CheckpointManager(ckpt_dir, cfg.checkpoint.keep,
                                      rank=self.dist.rank, barrier=barrier)
        self.step = 0
        # overflow_total: fp16 steps whose update GradScaler skipped (their loss was finite, a gradient was not)
        self.counters = {"nonfinite_total": 0, "nonfinite_in_row": 0, "overflow_total": 0}
        self.bad_files: set[str] = set()
        self._listed: set[str] = set()  # the names in OUT/skipped_files.txt up to byte _listed_at (_record_skipped)
        self._listed_at = 0
        self._listed_unsynced = False  # this process appended to OUT/skipped_files.txt since its last save
        self._metrics: Optional[MetricsWriter] = None  # fit's, while it runs (_sync_logs)
        self._bad_gathered = (0, 0)  # (the summed count, the distinct count) at the last gather of names
        warm = t.collapse_warmup_steps if t.collapse_warmup_steps >= 0 else max(50, t.max_steps // 10)
        self.monitor = CollapseMonitor(cfg.head.num_prototypes, warm)
        self.flops_per_image = _train_flops_per_image(cfg, self.data.spec)
        self._stop_signal = None
        self.resumed_from: Optional[Path] = None
        # The checkpoint an explicit checkpoint.resume started this lineage from (kept in every checkpoint)
        self.origin: Optional[str] = None
        # Where checkpoint.init_from took this run's initial weights from (init_from.InitSource.record; kept in
        # every checkpoint, so that a rerun knows its checkpoints for the continuation of that start)
        self.initialised_from: Optional[dict] = None
        normalize_prototypes(self.model)
        self._maybe_resume()
        if self.dist.is_main:  # only once the resume checks passed: a refused run leaves the run's config alone
            write_atomic(self.out / "config.yaml", lambda p: p.write_text(C.dumps(cfg)))

    # -----------------------------------------------------------------------------------------------------
    # Checkpoints.

    def _maybe_resume(self) -> None:
        mode = self.cfg.checkpoint.resume
        if mode == "never":
            if self.ckpt.latest() is not None:
                raise FileExistsError(f"{self.ckpt.dir} already holds checkpoints and checkpoint.resume='never': "
                                      f"use another --out, or checkpoint.resume=auto to continue that run")
            if self.cfg.checkpoint.init_from:
                self._init_from()
            return
        if mode == "auto":
            path = self.ckpt.latest()
            if path is None:
                self._check_checkpoints_not_elsewhere()
            if path is not None:
                if self.cfg.checkpoint.init_from:
                    self._check_continues_init(path)
                self.load(path)
            elif self.cfg.checkpoint.init_from:
                self._init_from()
            return
        if not mode.strip():  # (Path('') is the current folder: run in another run's folder, it continued that one)
            raise C.ConfigError("config key 'checkpoint.resume' must be 'auto', 'never' or the path of a checkpoint, "
                                "got ''")
        mode = os.path.expanduser(mode)  # '~/runs/x' from a YAML file or a quoted --set, which no shell expanded
        latest = self.ckpt.latest()
        if latest is not None and _started_from(read_meta(latest).get("origin"), Path(mode)):
            # The same command again after a stop or a preemption (its starting checkpoint may be pruned by now,
            # or the run it names have newer checkpoints by now)
            log.info("checkpoint.resume=%s: continuing the run started from it at %s", mode, latest)
            self.load(latest)
            return
        try:
            requested = agreed_checkpoint(mode)  # (another run still saving: every rank takes one)
        except FileNotFoundError as e:  # the key that gave the path, as every other config error names it
            raise FileNotFoundError(f"checkpoint.resume: {e}") from None
        path, newer = self._explicit_start(requested)
        self.load(path)  # every check (architecture, optimizer, layout, readable files) before anything moves
        if newer:
            self._move_aside(path, newer)
        if path == requested:  # a new lineage starts here; its checkpoints say so (_explicit_start)
            self.origin = str(requested.resolve())

    def _check_checkpoints_not_elsewhere(self) -> None:
        """checkpoint.resume=auto finding no checkpoint: refuse, naming it, where OUT is a run whose config.yaml
        puts its checkpoints in another folder that holds some (checkpoint.dir changed, or left out, on the
        rerun). Starting over there would drop the run's metrics history past step 0 and train from scratch
        without a word, beside the checkpoints it was meant to continue."""
        if not (self.out / "config.yaml").is_file():
            return
        then = (run_checkpoint_dir(self.out) or [self.out / "checkpoints"])[0]
        if then.resolve() == self.ckpt.dir.resolve():
            return
        found = list_checkpoints(then)
        if found:
            raise FileExistsError(f"{self.out} is a run whose checkpoints are in {then} (checkpoint.dir of its "
                                  f"config.yaml; latest {found[-1].name}), but this run's checkpoint folder "
                                  f"{self.ckpt.dir} holds none: set checkpoint.dir={then} to continue that run, or "
                                  f"use another --out for a new one")

    def _init_from(self) -> None:
        """checkpoint.init_from on a run without checkpoints: the source's weights of checkpoint.init_parts
        into the model; everything else stays as built for step 0 (init_from module doc)."""
        c = self.cfg.checkpoint
        src = resolve_init_source(c.init_from)
        check_init_architecture(src, self.cfg)  # before anything is read
        resize = pos_resize(src, self.cfg)  # (another model.img_size: the position embedding resampled)
        load_init_weights(src, self.model, self.dims, c.init_parts, resize)
        self.initialised_from = src.record(c.init_parts, resize)
        if resize is not None:
            log.info("%s", resize.describe())
        changed = not_shaping_changes(src, self.cfg)
        log.info("initialised from %s%s", src.describe(c.init_parts),
                 f"; changed from the source: {'; '.join(changed)}" if changed else "")
        norm = normalisation_changes(src, self.cfg)
        if norm:  # allowed (new data may have its own statistics), but mostly a preset's or a config's default
            log.warning("checkpoint.init_from=%s: this run normalises its images otherwise than the source's "
                        "backbone was trained (%s): its features were learned for the source's normalisation; "
                        "set data.crops.mean and data.crops.std to the source's unless the change is meant",
                        src.given, "; ".join(norm))

    def _check_continues_init(self, latest: Path) -> None:
        """checkpoint.init_from on a run that has checkpoints already: they must continue a run initialised
        from that same source (a rerun after a stop), which then resumes as any run does; another run's
        checkpoints in this folder are refused rather than continued in place of the initialisation asked for."""
        c = self.cfg.checkpoint
        record = read_meta(latest).get("init_from")
        where = init_path(c.init_from)
        named = c.init_from if where == c.init_from else f"{c.init_from} (here {where})"  # (a relative path)
        if not same_source(record, c.init_from):
            then = f"was initialised from {record.get('path')}" if isinstance(record, dict) else \
                "was not initialised by checkpoint.init_from"
            raise FileExistsError(f"checkpoint.init_from={named}: {self.ckpt.dir} already holds checkpoints "
                                  f"of a run that {then} (latest {latest.name}): use another --out for the new "
                                  f"run, or drop checkpoint.init_from to continue that one")
        if record.get("resolved") != str(Path(where).resolve()):  # the same path, leading elsewhere now
            log.warning("checkpoint.init_from=%s leads to %s now, but to %s when this run was initialised from "
                        "it: the run goes on from its own checkpoints, initialised from the latter",
                        named, Path(where).resolve(), record.get("resolved"))
        log.info("checkpoint.init_from=%s: this run has checkpoints of its own (it was initialised from it); "
                 "resuming from its latest, %s, not initialising again", named, latest)

    def _explicit_start(self, path: Path) -> tuple[Path, list[Path]]:
        """Where ``checkpoint.resume=PATH`` resumes, and this folder's checkpoints to move aside first.

        PATH, or the latest checkpoint of this run if that one continues a run started from PATH (the same
        command rerun after a stop or a preemption). Newer checkpoints in this run's folder would shadow the
        new run's (the next automatic resume, and the pruning of old ones, go by step): a rollback to an
        earlier checkpoint of this folder moves them aside (``_move_aside``, once the checkpoint has loaded);
        newer checkpoints of a run started elsewhere (or written before checkpoints recorded their origin) are
        refused, named."""
        latest = self.ckpt.latest()
        if latest is None or latest.resolve() == path.resolve():
            return path, []
        if read_meta(latest).get("origin") == str(path.resolve()):
            log.info("checkpoint.resume=%s: continuing the run started from it at %s", path, latest)
            return latest, []
        start = int(read_meta(path)["step"])
        newer = [p for p in list_checkpoints(self.ckpt.dir)
                 if int(read_meta(p)["step"]) >= start and p.resolve() != path.resolve()]
        if not newer or path.parent.resolve() == self.ckpt.dir.resolve():  # nothing newer, or a rollback
            return path, newer
        raise FileExistsError(f"checkpoint.resume={path} (step {start}): {self.ckpt.dir} already holds "
                              f"{', '.join(p.name for p in newer)}, which do not continue from it and would be "
                              f"taken for this run's newer checkpoints: use checkpoint.resume=auto to continue "
                              f"them, move them away, or use another --out")

    def _move_aside(self, path: Path, newer: list[Path]) -> None:
        """A rollback to ``path``: this run's ``newer`` checkpoints go into a new ``superseded-*`` folder of
        the checkpoint folder (kept, out of the way of latest() and the pruning)."""
        barrier()  # every rank has listed the folder (the same decision) before rank 0 changes it
        if self.dist.is_main:
            aside = Path(tempfile.mkdtemp(prefix=f"superseded-{time.strftime('%Y%m%d-%H%M%S')}-",
                                          dir=self.ckpt.dir))
            for p in newer:
                os.replace(p, aside / p.name)
            log.warning("checkpoint.resume=%s: rolling back; the newer checkpoints %s moved to %s", path,
                        ", ".join(p.name for p in newer), aside)
        barrier()

    def save(self) -> Path:
        self._check_weights_finite()
        tp_rank = self.dims.tp_rank
        tensors = S.model_tensors(self.model, tp_rank)
        optim, slots = S.optimizer_tensors(self.model, self.opt, tp_rank)
        tensors.update(optim)
        rank_state = {"rng": S.rng_state(), "tracker": get_rng_tracker().state_dict(),
                      "queue": self.queue.state_dict(), "bad_files": sorted(self.bad_files)}
        meta = {"step": self.step, "data": self.data.state_dict(), "scheduler": self.sched.state_dict(),
                "freezer": self.freezer.state_dict(), "counters": dict(self.counters),
                "collapse": self.monitor.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "world_size": self.dist.world, "dp": self.dims.dp, "tp": self.dims.tp,
                "optim_slots": slots, "tp_layout": S.tp_layout(self.model), "time": time.time(),
                "origin": self.origin, "init_from": self.initialised_from}
        with nvtx_range("checkpoint", self.cfg.logging.nvtx):
            self._sync_logs()
            path = self.ckpt.save(self.step, tensors, rank_state, meta, C.dumps(self.cfg))
        log.info("saved checkpoint %s", path)
        return path

    def _sync_logs(self) -> None:
        """What this process logged of the steps so far (metrics.jsonl, eval_history.jsonl, TensorBoard,
        skipped_files.txt) onto the disk before the checkpoint that follows them is committed. A run resumed
        from it logs only the steps after it, and lists only the unreadable files met after it (the ones met
        before are in its bad_files): a crash of the machine that kept the checkpoint (fsynced) but lost the
        unsynced tail of these files lost those records for good. A sync that fails (an I/O error, a full
        network disk, TensorBoard's writer) is said and the save goes on: the checkpoint matters more than the
        logs' tails."""
        wrote = self._listed_unsynced or (self._metrics is not None and self._metrics.active)
        try:
            if self._metrics is not None:
                self._metrics.sync()
            if self._listed_unsynced:
                sync_file(self.out / "skipped_files.txt")
                self._listed_unsynced = False
            if wrote:  # their names (created, or metrics.jsonl renamed over by a resumed run's rewrite)
                sync_folder(self.out)
        except Exception as e:  # (also TensorBoard's writer thread's error, which its flush raises)
            log.warning("cannot sync the run's logs in %s (%s: %s): a crash of the machine may lose their last "
                        "records; saving the checkpoint anyway", self.out, type(e).__name__, e)

    def _check_weights_finite(self) -> None:
        """NonFiniteLossError, before anything is written, where some weight is NaN or inf on any process.

        A skipped step (non-finite loss) changes no weight, but a step whose loss was finite and one of whose
        gradients was not (bf16 and fp32 have no gradient scaler to catch it) makes LARS or AdamW write NaN
        into the weights. Saved, such a checkpoint became the one to resume from, and checkpoint.keep pruned
        the finite ones after a few more saves. (One max-abs pass per tensor shard, one small all-reduce.)"""
        local = [t for t in (local_tensor(p.detach()) for p in self.model.parameters()) if t.numel()]
        device = local[0].device if local else self.device
        bad = (~torch.isfinite(torch.stack(torch._foreach_norm(local, ord=math.inf)))).sum().float().reshape(1) \
            if local else torch.zeros(1, device=device)
        if float(all_reduce_sum(bad)[0]) > 0:
            raise NonFiniteLossError(
                f"the weights are NaN or inf at step {self.step} (a finite loss with a non-finite gradient): not "
                f"saved; the last checkpoint ({self.ckpt.latest() or 'none yet'}) holds finite weights: "
                f"resume from it, with a lower optim.lr")

    def _saved_this_step(self) -> bool:
        latest = self.ckpt.latest()
        return latest is not None and read_meta(latest)["step"] == self.step

    def load(self, path: Path) -> None:
        meta = read_meta(path, required=_META_KEYS)
        saved = read_saved_config(path)
        _check_compatible(path, saved, self.cfg, int(meta["step"]))
        _say_batch_and_rate_changes(saved, self.cfg, meta, self.dims.dp)
        if meta["tp"] != self.dims.tp:
            raise ValueError(f"checkpoint {path} was written with parallel.tp={meta['tp']}; resuming needs the same "
                             f"parallel.tp (the data-parallel size may change), got parallel.tp={self.dims.tp}")
        tp_rank = self.dims.tp_rank
        dest = S.model_tensors(self.model, tp_rank)
        dest.update(S.optimizer_destination(self.model, self.opt, meta["optim_slots"], tp_rank))
        load_tensors(path, dest)
        S.load_model_tensors(self.model, dest, tp_rank)
        self.step = int(meta["step"])
        self.sched.load_state_dict(meta["scheduler"])
        self.freezer.load_state_dict(meta["freezer"])
        self.counters.update(meta["counters"])
        if meta.get("collapse"):  # (checkpoints before it: the window restarts empty)
            self.monitor.load_state_dict(meta["collapse"])
        if self.scaler is not None and meta.get("scaler"):
            self.scaler.load_state_dict(meta["scaler"])
        self.data.load_state_dict(meta["data"])
        same_world = meta["world_size"] == self.dist.world
        rank_state = load_rank_state(path, self.dist.rank, required=True) if same_world else None
        if rank_state is not None:
            S.set_rng_state(rank_state["rng"])
            get_rng_tracker().load_state_dict(rank_state["tracker"])
            try:
                self.queue.load_state_dict(rank_state["queue"])  # (it refuses a queue of another shape untouched)
                self.queue.to(self.device)  # (read onto the CPU)
            except QueueShapeError:
                # Another loss.queue_length (the collapse warning's remedy), data.batch_size (the length is
                # rounded to the global batch) or loss.crops_for_assign: the saved queue has another shape.
                # It refills in queue_length / global batch steps, as after a change of the number of processes.
                then = lambda section, key: (saved.get(section) or {}).get(key)  # noqa: E731
                log.warning("%s: the checkpoint's holds %d embeddings per rank, this run's %d (loss.queue_length "
                            "%s -> %s, data.batch_size %s -> %s, loss.crops_for_assign %s -> %s)",
                            "the SwAV queue restarts empty" if self.queue.enabled else "the SwAV queue is dropped",
                            rank_state["queue"]["local_length"], self.queue.local_length,
                            then("loss", "queue_length"), self.cfg.loss.queue_length, then("data", "batch_size"),
                            self.cfg.data.batch_size, then("loss", "crops_for_assign"),
                            list(self.cfg.loss.crops_for_assign))
            self.bad_files = set(rank_state["bad_files"])
        else:
            # Another number of processes: fresh per-rank streams, deterministic in (seed, step); empty queue.
            seed_parallel_rng(mix_seed(self.cfg.train.seed, self.step), self.dims)
            log.warning("resuming %s written by %d processes with %d: RNG streams reseeded, SwAV queue restarts "
                        "empty, the remaining images of the epoch are split over the new ranks",
                        path, meta["world_size"], self.dist.world)
        self.resumed_from = path
        self.origin = meta.get("origin")
        self.initialised_from = meta.get("init_from")
        log.info("resumed from %s (step %d)", path, self.step)

    # -----------------------------------------------------------------------------------------------------
    # The step.

    def train_step(self, crops: list[torch.Tensor], epoch: int, want_signals: bool) -> dict:
        cfg, nv = self.cfg, self.cfg.logging.nvtx
        lc = cfg.loss
        running = [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())
                   for m in self._batch_norms]
        with nvtx_range("forward", nv):
            with torch.autocast(self.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None):
                out = self.model(crops, queue=self.queue.embeddings())
            loss = swav_loss(out.scores, crops_for_assign=lc.crops_for_assign, temperature=lc.temperature,
                             epsilon=lc.epsilon, iterations=lc.sinkhorn_iterations, queue_scores=out.queue_scores,
                             group=self.dims.dp_group, prototype_group=self.dims.tp_group)
        with nvtx_range("communication", nv):
            # One small all-reduce: the mean loss over processes (any NaN on any rank makes it NaN, so every
            # rank skips together), the stop flag of a pending SIGTERM, and the unreadable files met so far
            # (summed over ranks: a file met by two ranks counts twice).
            flags = torch.stack([loss.detach().float(),
                                 torch.tensor(float(self._stop_signal is not None), device=loss.device),
                                 torch.tensor(float(len(self.bad_files)), device=loss.device)])
            flags = all_reduce_sum(flags).cpu() / torch.tensor([self.dist.world, 1.0, 1.0])  # NCCL: on the device
        loss_value, stop = float(flags[0]), bool(flags[1] > 0)
        record = {"loss": loss_value, "skipped_files": int(flags[2])}
        if not math.isfinite(loss_value):
            self.opt.zero_grad(set_to_none=True)
            for m, (mean, var, count) in zip(self._batch_norms, running):
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
                m.num_batches_tracked.copy_(count)
            self.freezer.skip()
            self.counters["nonfinite_total"] += 1
            self.counters["nonfinite_in_row"] += 1
        else:
            self.counters["nonfinite_in_row"] = 0
            with nvtx_range("backward", nv):
                (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            frozen = self.freezer.after_backward()
            with nvtx_range("optimizer", nv):
                if self.scaler is not None:
                    self.scaler.unscale_(self.opt)
                    _agree_on_overflow(self.scaler, self.opt)
                if cfg.train.grad_clip > 0:
                    record["grad_norm"] = clip_grad_norm(self.model, cfg.train.grad_clip)
                if self.scaler is not None:
                    self.scaler.step(self.opt)
                    # GradScaler skips the update silently where the gradients overflowed (agreed over every
                    # process above): counted, so that a run's metrics show how many steps changed no weight.
                    # (step already copied these flags to the host; update clears them.)
                    if any(f.item() for f in self.scaler._found_inf_per_device(self.opt).values()):
                        self.counters["overflow_total"] += 1
                    self.scaler.update()
                    if want_signals:
                        record["loss_scale"] = self.scaler.get_scale()
                else:
                    self.opt.step()
                self.opt.zero_grad(set_to_none=True)
                normalize_prototypes(self.model)
            self.queue.push(out.embeddings.detach(), epoch)
            record["prototypes_frozen"] = frozen
            if want_signals:
                a = lc.crops_for_assign[0]
                b = crops[0].shape[0]
                record.update(collapse_signals(out.scores[a], out.embeddings[a * b:(a + 1) * b],
                                               num_prototypes=cfg.head.num_prototypes, temperature=lc.temperature,
                                               epsilon=lc.epsilon, iterations=lc.sinkhorn_iterations,
                                               group=self.dims.dp_group, prototype_group=self.dims.tp_group))
        record["lr"] = self.sched.lr  # the rate this step's update used (the step below moves to the next)
        self.sched.step()
        self.step += 1
        record["stop"] = stop
        return record

    # -----------------------------------------------------------------------------------------------------
    # The loop.

    def fit(self) -> dict:
        """Train to ``train.max_steps`` (resumed where the last checkpoint left off); evaluate at the end."""
        try:
            with _forced_attention(self.cfg.train.attention_backend):
                return self._fit()
        finally:
            self.release()

    def _fit(self) -> dict:
        cfg, t = self.cfg, self.cfg.train
        main = self.dist.is_main
        metrics = MetricsWriter(self.out, active=main, tensorboard=cfg.logging.tensorboard,
                                progress=cfg.logging.progress, total_steps=t.max_steps, start_step=self.step)
        baseline = self._random_init_eval(metrics)
        self._metrics = metrics
        old_handler = _install_stop_handler(self)
        last_log_t, last_log_step, wait_acc, paused = time.perf_counter(), self.step, 0.0, 0.0
        peak = peak_flops(self.device)
        try:
            while self.step < t.max_steps:
                log_now = (self.step + 1) % cfg.logging.every == 0 or self.step + 1 == t.max_steps
                epoch = self.data.epoch
                with nvtx_range("data", cfg.logging.nvtx):
                    crops, skipped = self.data.next()
                wait_acc += self.data.last_wait
                self._record_skipped(skipped)
                rec = self.train_step(crops, epoch, want_signals=log_now)
                metrics.advance()
                self._check_bad_fraction(rec["skipped_files"], epoch)
                if self.counters["nonfinite_in_row"] >= t.max_nonfinite_steps:
                    raise NonFiniteLossError(
                        f"{self.counters['nonfinite_in_row']} steps in a row with a non-finite loss (train."
                        f"max_nonfinite_steps={t.max_nonfinite_steps}); the last checkpoint "
                        f"({self.ckpt.latest() or 'none yet'}) holds finite weights. Lower optim.lr, set "
                        f"train.grad_clip, or use train.precision=bf16/fp32")
                if log_now:
                    now = time.perf_counter()
                    dt = max(now - last_log_t - paused, 1e-9)  # evaluation and checkpoint time excluded
                    n_steps = self.step - last_log_step
                    ips = n_steps * cfg.data.batch_size * self.dims.dp / dt
                    record = {"step": self.step, "epoch": epoch, "loss": rec["loss"], "lr": rec["lr"],
                              "images_per_s": ips, "data_wait": min(1.0, wait_acc / dt),
                              "step_time": dt / max(n_steps, 1),
                              "nonfinite_skipped": self.counters["nonfinite_total"],
                              **({"overflow_skipped": self.counters["overflow_total"]} if self.scaler else {}),
                              "skipped_files": rec["skipped_files"],
                              "queue_active": self.queue.full}
                    record.update({k: v for k, v in rec.items() if k not in ("loss", "skipped_files", "stop")})
                    if peak:
                        record["mfu"] = ips * self.flops_per_image / (peak * self.dist.world)
                    if "assign_entropy" in rec:
                        warning = self.monitor.update(self.step, rec["loss"], rec)
                        if warning and main:
                            metrics.message("WARNING " + warning)
                    metrics.write(record)
                    last_log_t, last_log_step, wait_acc, paused = now, self.step, 0.0, 0.0
                t_pause = time.perf_counter()
                # The last step's evaluation and save are eval.at_end's and checkpoint.at_end's; without them,
                # the periodic ones that fall on it (the last step's weights were never saved: a rerun trained
                # the steps since the previous save again, and an export took that one's weights).
                last = self.step >= t.max_steps
                if cfg.eval.every and self.step % cfg.eval.every == 0 and not (last and cfg.eval.at_end):
                    res = self.evaluate()
                    if main:
                        metrics.write_eval(self.step, res)
                        metrics.message(f"step {self.step}: " + _format_eval(res))
                if cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0 and not (last and
                                                                                           cfg.checkpoint.at_end):
                    self.save()
                paused += time.perf_counter() - t_pause
                if rec["stop"]:
                    if not self._saved_this_step():  # (a periodic save may just have written it)
                        self.save()
                    metrics.message(f"stopped by signal at step {self.step}; rerun the same command to resume")
                    return {"step": self.step, "stopped": True, "out": str(self.out), "signal": self._stop_signal}
            if cfg.checkpoint.at_end and not self._saved_this_step():
                self.save()
        finally:
            _restore_stop_handler(old_handler)
            self._metrics = None
            self.data.close()
            metrics.close()
        return self._finish(baseline)

    def _finish(self, baseline: Optional[dict]) -> dict:
        cfg = self.cfg
        result: dict = {"step": self.step, "out": str(self.out)}
        if cfg.eval.at_end:
            try:
                res = self.evaluate()
            except KeyboardInterrupt:
                # Ctrl-C after the last checkpoint: training is complete and saved, only its evaluation is lost
                # (the stop handler is gone by now, so one Ctrl-C lands here; the same command, rerun, finds the
                # run complete and evaluates it).
                if self.dist.is_main:
                    log.warning("Ctrl-C during the final evaluation: training is complete and its checkpoint "
                                "saved; rerun the same command to evaluate it")
                return {**result, "stopped": True, "signal": signal.SIGINT, "eval_interrupted": True}
            if self.dist.is_main:
                ev = {k: res[k] for k in ("knn_top1", "linear_top1") if k in res}
                if baseline:
                    ev.update({f"{k}_random_init": baseline[k] for k in ("knn_top1", "linear_top1") if k in baseline})
                ev.update({"step": self.step, "dataset": cfg.eval.dataset, "knn_k": cfg.eval.knn_k,
                           "knn_temperature": cfg.eval.knn_temperature, "n_train": res.get("n_train"),
                           "n_test": res.get("n_test")})
                write_atomic(self.out / "eval.json", lambda p: p.write_text(json.dumps(ev, indent=1)))
                result["eval"] = ev
        if self.dist.is_main and cfg.logging.plot:
            result["plot"] = plot_metrics(read_metrics(self.out / "metrics.jsonl"), self.out / "plot.png",
                                          num_prototypes=cfg.head.num_prototypes, title=str(self.out))
        return result

    # -----------------------------------------------------------------------------------------------------
    # Evaluation.

    @property
    def evaluator(self):
        if self._evaluator is None:
            from ..eval import Evaluator
            c = self.cfg
            self._evaluator = Evaluator(c.eval, image_size=c.data.crops.global_size, mean=c.data.crops.mean,
                                        std=c.data.crops.std, device=self.device, group=self.dims.dp_group,
                                        compute=self.dist.is_main, digits_size=c.data.digits_size,
                                        autocast_dtype=self.amp, max_pixels=c.data.max_image_pixels,
                                        max_bytes=c.data.max_image_bytes)
        return self._evaluator

    def evaluate(self) -> dict:
        with _forced_attention(self.cfg.train.attention_backend), nvtx_range("eval", self.cfg.logging.nvtx):
            return self.evaluator.evaluate(self.backbone)

    def _random_init_eval(self, metrics: MetricsWriter) -> Optional[dict]:
        """kNN/linear of the model at its initialisation, computed before the first step (kept in
        OUT/eval_random_init.json for resumed runs)."""
        e = self.cfg.eval
        if not (e.at_end and e.random_init_baseline):
            return None
        if self.initialised_from is not None:
            # Its step-0 weights are the source's: scores of them would be reported as a random initialisation.
            log.warning("eval.random_init_baseline: this run started from the weights of %s, not from a random "
                        "initialisation; eval.json will lack the random-initialisation scores (seer eval "
                        "--random-init measures them)", self.initialised_from.get("path"))
            return None
        path = self.out / "eval_random_init.json"
        settings = self._eval_settings()
        if path.is_file():
            try:
                saved = json.loads(path.read_text())
            except ValueError:  # written by a version that did not write it atomically, and cut short
                log.warning("%s is unreadable; eval.json will lack the random-initialisation scores", path)
                return None
            # Scores taken with other evaluation settings (another eval.dataset, say) are no baseline for this
            # evaluation: eval.json would compare two different measurements. (Files written before the
            # settings were recorded are used as they are.)
            then = saved.get("settings") if isinstance(saved, dict) else None
            if isinstance(then, dict):
                changed = [k for k in settings if then.get(k) != settings[k]]
                if changed:
                    log.warning("%s was measured with other evaluation settings (%s); eval.json will lack the "
                                "random-initialisation scores (seer eval --random-init measures them with these "
                                "settings)", path, ", ".join(f"{k}: {then.get(k)!r} then, {settings[k]!r} now"
                                                             for k in changed))
                    return None
            missing = [k for k, on in (("knn_top1", e.knn), ("linear_top1", e.linear)) if on and k not in saved]
            if missing:
                log.warning("%s has no %s (that protocol was off before the first step); eval.json will lack "
                            "it", path, " or ".join(missing))
            return saved
        if self.step > 0:
            log.warning("no random-initialisation evaluation recorded before step %d; eval.json will lack it",
                        self.step)
            return None
        res = self.evaluate()
        if self.dist.is_main:
            record = {**res, "settings": settings}
            write_atomic(path, lambda p: p.write_text(json.dumps(record, indent=1)))
            metrics.message("random initialisation: " + _format_eval(res))
        return res

    def _eval_settings(self) -> dict:
        """What an evaluation's scores depend on besides the weights (the dataset as an absolute path)."""
        c = self.cfg
        e = c.eval
        dataset = e.dataset if e.dataset == "digits" else os.path.abspath(os.path.expanduser(e.dataset))
        return {"eval.dataset": dataset, "eval.image_size": e.image_size or c.data.crops.global_size,
                "eval.knn_k": e.knn_k, "eval.knn_temperature": e.knn_temperature,
                "eval.linear_weight_decays": list(e.linear_weight_decays), "eval.linear_max_iter": e.linear_max_iter,
                "eval.test_fraction": e.test_fraction, "eval.split_seed": e.split_seed,
                "eval.max_images": e.max_images, "data.digits_size": c.data.digits_size,
                "data.crops.mean": list(c.data.crops.mean), "data.crops.std": list(c.data.crops.std),
                "train.precision": self.precision}  # (the evaluation's autocast: resolved, not 'auto')

    # -----------------------------------------------------------------------------------------------------

    def _check_bad_fraction(self, skipped_files: int, epoch: int) -> None:
        """Stop every rank when more than data.max_bad_fraction of the dataset is unreadable (a wrong path or
        format, not a few bad files), judged in the first epoch (later ones meet the same files again).

        ``skipped_files`` (the same on every rank) sums the ranks' own counts: an upper bound of the distinct
        files, which counts a file once per tensor-parallel rank (they read the same images) and again where
        several ranks walk past it to a replacement. Only when that bound passes the limit are the ranks' file
        names gathered for the exact count (a collective that every rank enters, as the bound is shared), and
        again only once the files met since could take the last exact count past the limit: that count grows
        by at most what the bound grew (the check runs every step; a gather pickles every name)."""
        limit = self.cfg.data.max_bad_fraction * len(self.data)
        bound_then, distinct_then = self._bad_gathered
        if epoch != 0 or skipped_files <= limit or distinct_then + (skipped_files - bound_then) <= limit:
            return
        names = set(self.bad_files)
        if self.dist.world > 1:
            gathered: list = [None] * self.dist.world
            torch.distributed.all_gather_object(gathered, sorted(self.bad_files))
            names = set().union(*gathered)
        self._bad_gathered = (skipped_files, len(names))
        if len(names) > limit:
            raise DataError(f"{len(names)} of the {len(self.data)} images of data.source are unreadable so far, more "
                            f"than data.max_bad_fraction={self.cfg.data.max_bad_fraction} of them (listed in "
                            f"{self.out / 'skipped_files.txt'}): check data.source and data.format, or raise "
                            f"data.max_bad_fraction")

    def _record_skipped(self, skipped) -> None:
        """Log and count each unreadable file once (it is met again every epoch, and a run of bad files is
        met once per index pointing into it). Into OUT/skipped_files.txt it goes once too: from the first
        tensor-parallel rank alone (the others read the same images), and not again where an earlier attempt
        of the run listed it (met after the checkpoint that this run resumed from, which does not count it), nor
        where another data-parallel process did (one rank's bad file can be another's replacement read): the
        processes append under a lock, each reading what the others appended since its last look."""
        new = list({s.name: s for s in skipped if s.name not in self.bad_files}.values())
        if not new:
            return
        self.bad_files.update(s.name for s in new)
        if self.dims.tp_rank != 0:
            return
        # A name that is not UTF-8 (kept as surrogate escapes) goes into the file as its own bytes, as the
        # list-file format reads it back, and into the log escaped.
        with open(self.out / "skipped_files.txt", "a+b") as f:
            _lock_file(f)  # (released when closed)
            f.seek(self._listed_at)
            since = f.read()  # the lines appended since this process last looked, its own included
            self._listed.update(line.decode("utf-8", "surrogateescape").partition("\t")[0]
                                for line in since.splitlines())
            out = []
            for s in new:
                line = skipped_line(s.name, s.reason)
                if line.partition("\t")[0] not in self._listed:
                    self._listed.add(line.partition("\t")[0])
                    out.append(line.encode("utf-8", "surrogateescape"))
                log.warning("skipped unreadable image %s (%s)", printable(s.name), s.reason)
            if out:
                # (a line cut short by a kill must not swallow the first new name)
                cut = f.tell() > 0 and not (since or _last_byte(f)).endswith(b"\n")
                f.write(b"\n" * cut + b"".join(out))
                f.flush()
                self._listed_unsynced = True
            self._listed_at = f.tell()


# ---------------------------------------------------------------------------------------------------------

def _lock_file(f) -> None:
    """An exclusive lock on the open file ``f`` (released when it is closed); nothing where the filesystem has
    no locks."""
    import fcntl
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
    except OSError:
        pass


def _last_byte(f) -> bytes:
    f.seek(-1, os.SEEK_END)
    return f.read(1)


def _format_eval(res: dict) -> str:
    parts = [f"{k} {res[k]:.1f}%" for k in ("knn_top1", "linear_top1") if k in res]
    return ", ".join(parts) or "(no scores)"


_ATTENTION_VAR = "SEER_KERNELS_BACKEND_ATTENTION"


@contextlib.contextmanager
def _forced_attention(name: str):
    """train.attention_backend forced process-wide while the run computes, and undone after it (another run
    in this process chooses its own). Through the environment, not ``use_backend``: the backward runs on
    autograd's own threads, which a context variable misses. An explicit environment setting wins."""
    if name == "auto" or os.environ.get(_ATTENTION_VAR):
        yield
        return
    os.environ[_ATTENTION_VAR] = name
    try:
        yield
    finally:
        os.environ.pop(_ATTENTION_VAR, None)


def _check_attention_backend(cfg: C.RunConfig, device: torch.device, amp: Optional[torch.dtype], *,
                             params: Optional[torch.dtype] = None) -> None:
    """ValueError naming train.attention_backend where the forced backend cannot run this model here (the
    Triton kernel on a CPU, in float32, at an unsupported head dim), before any work. The attention runs in
    ``amp`` (autocast), else in ``params`` (the blocks' parameter dtype: FSDP's param_dtype), else float32."""
    name = cfg.train.attention_backend
    if name == "auto" or os.environ.get(_ATTENTION_VAR):
        return
    from seer_kernels.ops import attention as op
    m = cfg.model
    tokens = (cfg.data.crops.global_size // m.patch_size) ** 2 + 1
    dtype = amp or params or torch.float32
    info = dict(where=device, dt=dtype, head_dim=m.embed_dim // m.num_heads, n_q=tokens, n_kv=tokens, batch=1,
                heads=m.num_heads // cfg.parallel.tp, grad=True, deterministic=False, in_op=False)
    why = op.DISPATCH.backends[name].reasons(device, dtype, info)
    if why:
        raise ValueError(f"train.attention_backend={name!r} cannot run this model on {device.type} in "
                         f"{str(dtype).replace('torch.', '')}: {'; '.join(why)}. Use 'auto' (or another of sdpa, "
                         "reference)")


def _train_flops_per_image(cfg: C.RunConfig, spec) -> float:
    """Training FLOPs per image for the crops of ``spec`` (the run's ``MultiCropSpec``)."""
    from ..plan import forward_flops_per_image
    crops = [(g.count, g.size) for g in spec.groups]
    return 3.0 * forward_flops_per_image(cfg.model, cfg.head, crops)


_ARCH_SECTIONS = ("model", "head")


def _check_compatible(path: Path, saved: dict, cfg: C.RunConfig, step: int) -> None:
    """Refuse, with the differing keys, a checkpoint (of ``step``; its run config ``saved``) whose architecture
    differs from the config's. The model keys that shape no tensor (NOT_SHAPING: regularisation, the init's
    spread, the norms' epsilon) may differ, as they may from checkpoint.init_from's source: said in the log."""
    now = C.to_dict(cfg)
    diffs = architecture_diffs(saved, now, _ARCH_SECTIONS, ignore=NOT_SHAPING)
    if diffs:
        raise C.ConfigError(f"checkpoint {path} has another architecture than the config: " + "; ".join(diffs))
    changed = not_shaping_diffs(saved, now)
    if changed:
        log.warning("resuming from %s with %s (they shape no tensor; from step %d on the run trains with the "
                    "config's values)", path, "; ".join(changed), step)
    steps = (saved.get("train") or {}).get("max_steps")
    if cfg.train.max_steps <= step:
        log.warning("train.max_steps is %d and the checkpoint is at step %d: nothing is left to train (raise "
                    "train.max_steps to continue)", cfg.train.max_steps, step)
    elif steps is not None and steps != cfg.train.max_steps:  # allowed (extending a run), but not silently
        log.warning("train.max_steps is %d, the checkpoint's run had %s: the learning-rate and weight-decay "
                    "schedules (warm-up, cosine) are recomputed over the new length from step %d on",
                    cfg.train.max_steps, steps, step)
    saved_opt = (saved.get("train") or {}).get("optimizer")
    if saved_opt is not None and saved_opt != cfg.train.optimizer:
        raise C.ConfigError(f"checkpoint {path} holds {saved_opt} optimizer state but train.optimizer="
                            f"{cfg.train.optimizer!r}: resume with train.optimizer={saved_opt!r}, or start a new "
                            f"run from its weights")


def _agree_on_overflow(scaler: torch.amp.GradScaler, opt: torch.optim.Optimizer) -> None:
    """Make every process skip an fp16 step, and lower its loss scale, when any process found an inf or NaN
    gradient. GradScaler looks at this process's gradients only; a tensor-parallel rank holds its own slice
    of the split weights, so an overflow in one slice made that rank alone skip: with LARS the other ranks
    entered its collective norm alone (a mismatch or a hang), with AdamW the replicated weights of the
    tensor-parallel ranks drifted apart and their loss scales differed. (An all-reduce over every process:
    FSDP's shards are covered too, and it is one float.)"""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return
    found = scaler._per_optimizer_states[id(opt)]["found_inf_per_device"]  # filled by unscale_
    if not found:
        return
    flags = list(found.values())
    total = all_reduce_sum(torch.stack([f.float().sum() for f in flags]).sum().reshape(1).to(flags[0].device))
    for f in flags:
        f.copy_((total > 0).to(f.dtype).reshape(f.shape))


def _say_batch_and_rate_changes(saved: dict, cfg: C.RunConfig, meta: dict, dp: int) -> None:
    """Warn when the resumed run's global batch (data.batch_size x data-parallel ranks) or its peak learning
    rate differs from the checkpoint's run's (its config ``saved``, its ``meta``): another optim.lr,
    optim.lr_reference_batch (a config written before it existed has none), or, with a reference, another
    global batch."""
    from ..optim import OptimConfig
    from ..optim.config import scaled_to_batch
    known = {f.name for f in dataclasses.fields(OptimConfig)}
    then_o = OptimConfig(**{k: v for k, v in (saved.get("optim") or {}).items() if k in known})
    then_batch = (saved.get("data") or {}).get("batch_size", cfg.data.batch_size) * \
        max(1, int(meta["world_size"]) // max(1, int(meta["tp"])))
    now_batch = cfg.data.batch_size * dp
    if now_batch != then_batch:  # allowed (another number of processes, data.batch_size), but not silently
        log.warning("the global batch is now %d images per step (data.batch_size %d x %d data-parallel ranks), "
                    "the checkpoint's run had %d: the data order goes on from the same image", now_batch,
                    cfg.data.batch_size, dp, then_batch)
    then = scaled_to_batch(then_o, then_batch).lr
    now = scaled_to_batch(cfg.optim, now_batch).lr
    if not math.isclose(then, now, rel_tol=1e-9):
        log.warning("the peak learning rate is now %.4g, the checkpoint's run had %.4g (optim.lr %s -> %s, "
                    "optim.lr_reference_batch %s -> %s, global batch %d -> %d): the schedule goes on at the new "
                    "rate from step %s", now, then, then_o.lr, cfg.optim.lr, then_o.lr_reference_batch,
                    cfg.optim.lr_reference_batch, then_batch, now_batch, meta["step"])


def _started_from(origin: Optional[str], given: Path) -> bool:
    """Whether a checkpoint whose lineage began at checkpoint ``origin`` (meta.json's 'origin') continues a run
    started with ``checkpoint.resume=given``: ``given`` is that checkpoint, or a run or checkpoints folder
    (resolved to its latest checkpoint at the start) that holds it. A folder's latest moves on while its run
    trains: taken again, a rerun of the same command dropped its own checkpoints for the other run's newest."""
    if origin is None:
        return False
    if origin == str(given.resolve()):
        return True
    if is_checkpoint_name(given.name):  # a checkpoint names that one only
        return False
    homes = {p.resolve() for p in (given, given / "checkpoints", *run_checkpoint_dir(given))}
    return Path(origin).parent in homes


# What Trainer.load reads from meta.json (read_meta refuses a file without them: an edited or foreign file)
_META_KEYS = ("step", "data", "scheduler", "freezer", "counters", "world_size", "tp", "optim_slots")


# OUT/train.log's handler on the 'seer' logger and the Trainers of this process writing to it: a run's log
# file stops receiving lines when its last Trainer releases it (another run in the same process, later or
# beside it, logged into every earlier run's train.log too).
_log_files: dict[str, list] = {}


def _log_to_file(path: Path) -> str:
    """Log to ``path`` (its handler shared by the Trainers of this process on it); the key to stop with."""
    key = str(path.resolve())
    entry = _log_files.get(key)
    if entry is None:
        h = logging.FileHandler(path, encoding="utf-8", errors="backslashreplace")
        h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root = logging.getLogger("seer")
        root.addHandler(h)
        root.setLevel(min(root.level or logging.INFO, logging.INFO))
        entry = _log_files[key] = [h, 0]
    entry[1] += 1
    return key


def _stop_logging_to_file(key: str) -> None:
    entry = _log_files.get(key)
    if entry is None:
        return
    entry[1] -= 1
    if entry[1] <= 0:
        del _log_files[key]
        logging.getLogger("seer").removeHandler(entry[0])
        entry[0].close()


# A second Ctrl-C this soon after the first is the same one arriving again (a rank in the terminal's process
# group that its launcher also forwards the signal to).
SIGINT_ECHO_S = 1.0


def _install_stop_handler(trainer: Trainer):
    """SIGTERM (preemption, scancel) and a first Ctrl-C (SIGINT) -> save a checkpoint at the end of the
    current step and exit cleanly. A second Ctrl-C (after SIGINT_ECHO_S) stops at once, as Python's default
    does (KeyboardInterrupt), losing the steps since the last checkpoint. (DataLoader workers ignore SIGINT:
    the main process ends them; worker_init.)"""
    first_int: list = []

    def on_term(signum, frame):
        trainer._stop_signal = signum

    def on_int(signum, frame):
        now = time.monotonic()
        if not first_int:
            first_int.append(now)
            trainer._stop_signal = signum
            if trainer.dist.is_main:
                log.warning("Ctrl-C: saving a checkpoint at the end of this step, then stopping (Ctrl-C again "
                            "stops at once, losing the steps since the last checkpoint)")
        elif now - first_int[0] >= SIGINT_ECHO_S:
            raise KeyboardInterrupt
    try:
        # A SIGINT ignored by whoever started us (a job started with '&' from a script) stays ignored.
        inherited = signal.getsignal(signal.SIGINT)
        return (signal.signal(signal.SIGTERM, on_term),
                signal.signal(signal.SIGINT, on_int) if inherited is not signal.SIG_IGN else inherited)
    except ValueError:  # not the main thread
        return None


def _restore_stop_handler(old) -> None:
    if old is not None:
        with contextlib.suppress(ValueError):
            signal.signal(signal.SIGTERM, old[0])
            signal.signal(signal.SIGINT, old[1])
