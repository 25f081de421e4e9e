"""``curate train``: the training loop.

AdamW with warm-up (then constant or cosine), gradient accumulation, gradient clipping, EMA, bf16 autocast
on CUDA, classifier-free-guidance dropout of the text and (separately) of the retrieval tokens. Multi-GPU and
multi-node through torchrun (DDP); the rank comes from torchrun's variables or, under ``srun``, from
Slurm's. TensorBoard logs go to ``<output>/logs`` (and to Weights & Biases with ``logging: wandb``,
:mod:`curate.train.trackers`). On GPUs: fp16 autocast with a gradient scaler, bitsandbytes' 8-bit AdamW,
gradient checkpointing and xformers attention are options; a pretrained pipeline's UNet is fine-tuned whole
or through LoRA adapters (then only the adapters are trained, checkpointed and averaged).

Deterministic on the CPU: the noise, timesteps and dropouts of step ``s`` come from a generator seeded with
``(seed, rank, s, micro-step)``, the data stream is deterministic (``curate.train.data``) and a checkpoint
holds everything else (weights, EMA, optimiser, data position), so a run resumed from a checkpoint ends with
the same weights as one that never stopped.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import time
from collections.abc import Mapping
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from curate.base import TrainError
from curate.train.checkpoint import (
    latest_checkpoint,
    load_optimizer,
    load_weights,
    read_state,
    save_checkpoint,
)
from curate.train.config import TrainConfig
from curate.train.data import ShardStream, find_shards, run_roots
from curate.train.model import Generator, Text, clip_from_run, load_frozen
from curate.train.validate import PromptScorer

__all__ = ["DistEnv", "Trainer", "dist_env", "train"]


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world: int = 1
    local_rank: int = 0


def dist_env(environ: dict[str, str] | None = None) -> DistEnv:
    """This process's rank: torchrun's RANK / WORLD_SIZE / LOCAL_RANK, else Slurm's SLURM_PROCID /
    SLURM_NTASKS / SLURM_LOCALID (one task per GPU under ``srun``), else a single process."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)))
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        return DistEnv(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)))
    return DistEnv()


def _seed(*parts: Any) -> int:
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:8], "big") % 2**63


def make_optimizer(o, params: list[torch.nn.Parameter], device: torch.device) -> torch.optim.Optimizer:
    """AdamW, or bitsandbytes' 8-bit AdamW (optimiser state in 8 bits: about 3/4 less of it on the GPU)."""
    if o.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise TrainError(
                "optim.optimizer adamw8bit needs bitsandbytes, which is not installed: pip install "
                "'curate[gpu]' (Linux with an NVIDIA GPU), or use optimizer: adamw"
            ) from None
        return bnb.optim.AdamW8bit(params, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay)
    return torch.optim.AdamW(params, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay)


def _lr_factor(step: int, warmup: int, total: int, schedule: str) -> float:
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "cosine":
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return 1.0


class Trainer:
    def __init__(
        self,
        cfg: TrainConfig,
        say=print,
        progress: bool = True,
        prompt_scorers: Mapping[str, PromptScorer] | None = None,
    ):
        self.cfg = cfg
        self.say = say
        self.progress = progress
        self.prompt_scorers = dict(prompt_scorers or {})
        if cfg.validation.adherence and "adherence" not in self.prompt_scorers:
            raise TrainError(
                "validation.adherence scores images with the sample world's analyser, which `curate train` and "
                "`curate demo` supply; this caller gave no 'adherence' prompt scorer: set it false"
            )
        self.env = dist_env()
        self.out = Path(cfg.output)

    # -- setup --------------------------------------------------------------------------------------------

    def _setup_distributed(self) -> None:
        if self.env.world > 1 and not torch.distributed.is_initialized():
            if "MASTER_ADDR" not in os.environ:
                raise TrainError(
                    "several ranks, but no MASTER_ADDR/MASTER_PORT: launch with torchrun, or export them "
                    "in the Slurm script (infra/slurm/train.sbatch does)"
                )
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            torch.distributed.init_process_group(backend, rank=self.env.rank, world_size=self.env.world)

    def _device(self) -> torch.device:
        if torch.cuda.is_available():
            torch.cuda.set_device(self.env.local_rank)
            return torch.device("cuda", self.env.local_rank)
        return torch.device("cpu")

    def build(self) -> None:
        cfg = self.cfg
        if cfg.schedule.threads:
            torch.set_num_threads(cfg.schedule.threads)
        self._setup_distributed()
        self.device = self._device()
        self.shards = find_shards(cfg.data.shards)
        self.roots = run_roots(cfg.data.shards)
        self.run_clip = clip_from_run(self.roots)
        text, vae, pretrained = load_frozen(cfg.model, self.run_clip, self.device)
        self.neighbours = None
        clip_dim = None
        if cfg.model.retrieval:
            from curate.train.retrieval import training_neighbours

            self.neighbours = training_neighbours(cfg.model.retrieval, self.roots, self._say0)
            clip_dim = getattr(self.neighbours, "dim", None)  # images_and_captions: no embeddings
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank and every rerun
        self.gen = Generator(cfg.model, cfg.data.resolution, text, vae, clip_dim, pretrained)
        self.model = self.gen.denoiser.to(self.device)
        self.trained = [n for n, p in self.model.named_parameters() if p.requires_grad]
        # with LoRA a checkpoint holds the adapters only (the frozen UNet is the pretrained pipeline's)
        self.saved = set(self.trained) if cfg.model.lora is not None else None
        self.ema = None
        if cfg.optim.ema_decay is not None:
            self.ema = copy.deepcopy(self.model).requires_grad_(False).eval()
        o = cfg.optim
        self.opt = make_optimizer(o, [p for p in self.model.parameters() if p.requires_grad], self.device)
        self.scaler = None
        if self._precision() == torch.float16:
            self.scaler = torch.amp.GradScaler("cuda")
        self.step = 0
        self.consumed: dict[str, dict[str, int]] = {}
        ckpt = latest_checkpoint(self.out)
        if ckpt is not None:
            self._resume(ckpt)
        self.ddp = (
            torch.nn.parallel.DistributedDataParallel(self.model, device_ids=[self.device.index])
            if self.env.world > 1 and self.device.type == "cuda"
            else torch.nn.parallel.DistributedDataParallel(self.model)
            if self.env.world > 1
            else self.model
        )
        cache = None
        if cfg.data.cache:
            from curate.train.cache import ShardCache, build_cache

            if self.env.rank == 0:
                build_cache(cfg, self.gen, self.shards, self.device, self._say0)
            if self.env.world > 1:
                torch.distributed.barrier()
            cache = ShardCache(self.out / "cache", latents=self.gen.vae is not None)
        mine = {int(w): n for w, n in self.consumed.get(str(self.env.rank), {}).items()}
        self.stream = ShardStream(
            self.shards,
            cfg.data,
            o.batch_size,
            seed=cfg.seed,
            rank=self.env.rank,
            world=self.env.world,
            consumed=mine,
            neighbours=self.neighbours,
            cache=cache,
        )
        self.autocast_dtype = self._precision()

    def _precision(self) -> torch.dtype | None:
        """The autocast dtype (None: fp32). fp16 needs CUDA (its gradient scaler is CUDA's)."""
        p, cuda = self.cfg.optim.precision, self.device.type == "cuda"
        if p == "fp16" and not cuda:
            raise TrainError("optim.precision fp16 needs a CUDA device; on the CPU use bf16 or fp32")
        if p == "bf16" or (p == "auto" and cuda):
            return torch.bfloat16
        return torch.float16 if p == "fp16" else None

    def _resume(self, ckpt: Path) -> None:
        state = read_state(ckpt)
        # validated first: a checkpoint from before a model field was added has that field's default
        try:
            trained_with = TrainConfig.model_validate(state.get("config", {})).to_dict()["model"]
        except ValueError:  # pydantic's ValidationError: a config this version no longer reads
            trained_with = None
        if trained_with != self.cfg.to_dict()["model"]:
            raise TrainError(
                f"{ckpt} was trained with another model config; use a new output folder or the same config"
            )
        partial = self.saved is not None
        load_weights(self.model, ckpt / "model.safetensors", partial)
        if self.ema is not None and (ckpt / "ema.safetensors").exists():
            load_weights(self.ema, ckpt / "ema.safetensors", partial)
        load_optimizer(self.opt, ckpt / "optimizer.safetensors")
        self.step = int(state["step"])
        self.consumed = state.get("consumed", {})
        self._say0(f"resumed from {ckpt} at step {self.step}")

    def _say0(self, line: str) -> None:
        if self.env.rank == 0:
            self.say(line)

    # -- one step ---------------------------------------------------------------------------------------------

    def loss(self, batch: dict[str, Any], micro: int) -> torch.Tensor:
        cfg, gen, dev = self.cfg, self.gen, self.device
        g = torch.Generator().manual_seed(_seed(cfg.seed, self.env.rank, self.step, micro))
        if "cached_mean" in batch:  # a draw from the cached latent distribution, as the VAE's sample() draws
            mean, std = batch["cached_mean"].to(dev), batch["cached_std"].to(dev)
            x0 = (mean + std * torch.randn(mean.shape, generator=g).to(dev)) * gen.scaling
        else:
            x0 = gen.encode_images(batch["pixels"].to(dev, non_blocking=True), generator=g)
        n = x0.shape[0]
        noise = torch.randn(x0.shape, generator=g).to(dev)
        t = torch.randint(0, gen.noise.config.num_train_timesteps, (n,), generator=g).to(dev)
        drop_text = (torch.rand(n, generator=g) < cfg.optim.cfg_dropout).to(dev)
        drop_rag = (torch.rand(n, generator=g) < cfg.optim.rag_dropout).to(dev)
        noisy = gen.noise.add_noise(x0, noise, t)
        target = noise if gen.prediction == "epsilon" else gen.noise.get_velocity(x0, noise, t)
        if "cached_states" in batch:
            text = Text(batch["cached_states"].to(dev), batch["cached_pooled"].to(dev))
        else:
            text = gen.text.encode(batch["captions"], dev)
        neighbours = batch.get("neighbours")
        if neighbours is not None:
            neighbours = neighbours.to(dev)
        elif "neighbour_images" in batch:
            neighbours = gen.encode_neighbours(batch["neighbour_images"], batch["neighbour_captions"], dev)
        ctx = torch.autocast(dev.type, self.autocast_dtype) if self.autocast_dtype else nullcontext()
        with ctx:
            pred = self.ddp(noisy, t, text, gen.null_text(dev), neighbours, drop_text, drop_rag)
        per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        gamma = cfg.optim.snr_gamma
        if gamma is None:
            return per_sample.mean()
        alphas = gen.noise.alphas_cumprod.to(dev)[t]
        snr = alphas / (1 - alphas)
        weight = torch.clamp(snr, max=gamma) / (snr if gen.prediction == "epsilon" else snr + 1)
        return (per_sample * weight).mean()

    @torch.no_grad()
    def _ema_update(self) -> None:
        decay = min(self.cfg.optim.ema_decay or 0.0, (1 + self.step) / (10 + self.step))
        live = dict(self.model.named_parameters())
        ema = dict(self.ema.named_parameters())
        for name in self.trained:  # frozen weights stay equal
            ema[name].lerp_(live[name].detach(), 1 - decay)
        for e, b in zip(self.ema.buffers(), self.model.buffers(), strict=True):
            e.copy_(b)

    # -- the loop -----------------------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        self.build()
        cfg, o = self.cfg, self.cfg.optim
        total = cfg.schedule.steps
        writer = None
        if self.env.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
            from curate.train.trackers import Trackers

            writer = Trackers(cfg, self.out)
        n_params = sum(p.numel() for p in self.model.parameters())
        self._say0(
            f"training {n_params / 1e6:.2f} M parameters on {len(self.shards)} shards, "
            f"{self.env.world} rank(s), {self.device}; text encoder {self.gen.text.name}; "
            f"{'latent' if self.gen.vae is not None else 'pixel'} space {self.gen.latent_size}px"
        )
        loader = iter(self.stream.loader())
        sched = lambda s: o.lr * _lr_factor(s, o.warmup_steps, total, o.lr_schedule)  # noqa: E731
        history: list[dict[str, Any]] = []
        started, seen, last_log = time.perf_counter(), 0, time.perf_counter()
        bar = self._bar(total)
        while self.step < total:
            for group in self.opt.param_groups:
                group["lr"] = sched(self.step)
            self.model.train()
            loss_sum = 0.0
            for micro in range(o.grad_accum):
                batch = next(loader)
                self._mark(batch)
                sync = micro == o.grad_accum - 1 or self.ddp is self.model
                with nullcontext() if sync else self.ddp.no_sync():
                    loss = self.loss(batch, micro)
                    scaled = loss / o.grad_accum
                    (self.scaler.scale(scaled) if self.scaler else scaled).backward()
                loss_sum += float(loss.detach()) / o.grad_accum
                seen += len(batch["uids"])
            if self.scaler is not None:
                self.scaler.unscale_(self.opt)
            if o.clip_grad:
                torch.nn.utils.clip_grad_norm_(
                    [p for p in self.model.parameters() if p.requires_grad], o.clip_grad
                )
            if self.scaler is not None:
                self.scaler.step(self.opt)
                self.scaler.update()
            else:
                self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            self.step += 1
            if self.ema is not None:
                self._ema_update()
            if bar is not None:
                bar.update(1, loss=loss_sum)
            if self.step % cfg.schedule.log_every == 0 or self.step == total:
                now = time.perf_counter()
                rate = seen * self.env.world / max(now - last_log, 1e-9)
                seen, last_log = 0, now
                history.append({"step": self.step, "loss": loss_sum, "lr": sched(self.step - 1)})
                if writer is not None:
                    writer.scalar("train/loss", loss_sum, self.step)
                    writer.scalar("train/lr", sched(self.step - 1), self.step)
                    writer.scalar("train/samples_per_s", rate, self.step)
            if self.step % cfg.checkpoint.every == 0 or self.step == total:
                self.save()
            every = cfg.validation.every
            if (every and self.step % every == 0) or self.step == total:
                self.validate(writer)
        if bar is not None:
            bar.close()
        if writer is not None:
            writer.close()
        seconds = time.perf_counter() - started
        summary = {"steps": self.step, "seconds": seconds, "history": history, "output": str(self.out)}
        if self.env.rank == 0:
            previous = self.out / "train.json"
            if previous.exists():  # a resumed run: the curve goes on from where the last one stopped
                before = json.loads(previous.read_text()).get("history", [])
                history[:0] = [h for h in before if h["step"] < (history[0]["step"] if history else 1 << 62)]
            (self.out / "train.json").write_text(json.dumps(summary, indent=2))
            from curate.train.report import write_train_report

            summary["report"] = str(write_train_report(self.out, history))
        if self.env.world > 1:
            torch.distributed.barrier()
        return summary

    def _mark(self, batch: dict[str, Any]) -> None:
        mine = self.consumed.setdefault(str(self.env.rank), {})
        mine[str(batch["worker"])] = int(batch["number"]) + 1

    def _bar(self, total: int):
        if not self.progress or self.env.rank != 0:
            return None
        return _Bar(total, self.step)

    def save(self) -> None:
        consumed = self.consumed
        if self.env.world > 1:
            gathered: list[Any] = [None] * self.env.world
            torch.distributed.all_gather_object(gathered, consumed.get(str(self.env.rank), {}))
            consumed = {str(r): c for r, c in enumerate(gathered)}
        if self.env.rank != 0:
            return
        state = {
            "config": self.cfg.to_dict(),
            "consumed": consumed,
            "text_encoder": {"name": self.gen.text.name, "run_clip": self.run_clip},
            "clip_dim": self.gen.clip_dim,
            "world": self.env.world,
        }
        save_checkpoint(
            self.out, self.step, self.model, self.ema, self.opt, state, self.cfg.checkpoint.keep, self.saved
        )

    def validate(self, writer=None) -> dict[str, Any] | None:
        if self.env.rank != 0:
            return None
        from curate.train.validate import validate

        denoiser = self.ema if self.ema is not None else self.model
        result = validate(self, denoiser, self.step)
        if writer is not None:
            for key, value in result.get("metrics", {}).items():
                if isinstance(value, int | float):
                    writer.scalar(f"val/{key}", value, self.step)
            if result.get("grid") is not None:
                writer.image("val/samples", result["grid"], self.step)
        return result


class _Bar:
    """A rich progress bar for the steps, with the loss."""

    def __init__(self, total: int, done: int):
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.progress = Progress(
            TextColumn("training"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total} steps, loss {task.fields[loss]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            transient=True,
        )
        self.progress.start()
        self.task = self.progress.add_task("train", total=total, completed=done, loss="-")

    def update(self, n: int, loss: float) -> None:
        self.progress.update(self.task, advance=n, loss=f"{loss:.4f}")

    def close(self) -> None:
        self.progress.stop()


def train(
    cfg: TrainConfig,
    say=print,
    progress: bool = True,
    prompt_scorers: Mapping[str, PromptScorer] | None = None,
) -> dict[str, Any]:
    """Train as ``cfg`` says. ``prompt_scorers`` are extra validation metrics by name (see
    :data:`curate.train.validate.PromptScorer`); ``validation.adherence`` needs one named ``adherence``."""
    return Trainer(cfg, say, progress, prompt_scorers).run()
