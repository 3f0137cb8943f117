"""The U-ViT's task on the training loop (training/engine.py): masked-token training on
token shards, `train(cfg)` (what `amused train` runs), and its start-up checks (the dataset, the tokenizers it was made with,
the model against the tokens, the batch against ranks and lanes), run before any step.

On a text "ids" dataset each micro-batch's caption ids go through the frozen CLIP text
tower (model.text_encoder; no grad, in the run's precision, outside the optimizer and the
checkpoint) and its outputs are rounded to float16, as a "states" dataset stores them, so
both kinds of dataset feed the U-ViT the same inputs for the same weights.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from amused.pipeline.shards import EMPTY_PROMPT, MANIFEST, ModelIdentity, TokenDataset, read_empty_prompt
from amused.plumbing.determinism import seed_all
from amused.plumbing.storage import VQGAN_SUBFOLDERS
from amused.tokenizer.text import TextEmbeddings, TextEncoder
from amused.training.checkpoint import write_config
from amused.training.config import TrainConfig
from amused.training.distributed import Layout, current_device, in_process_group, locked, rank0_decides, wants_bf16
from amused.training.engine import TrainResult, kernels, run_loop
from amused.training.lora import apply_lora, base_identity, check_same, record
from amused.training.state import TrainState, resume_state
from amused.training.uvit.data import ShardReader
from amused.training.uvit.model import (
    build_model,
    compile_transformer_blocks,
    enable_activation_checkpointing,
    mask_id,
    param_groups,
    token_grid,
)
from amused.training.uvit.objective import LossParts, draw_masks, masked_loss


class UViTTask:
    """Masked-token training of the U-ViT on token shards."""

    name = "train"
    plot = ("loss", "masked_accuracy", "lr")
    stats_size = 3  # cross-entropy sum, correct, masked count (this rank)

    def __init__(self, cfg: TrainConfig, model, dataset: TokenDataset, layout: Layout, rank: int, world: int,
                 device: torch.device, empty: dict | None, dtype: torch.dtype, text: TextEncoder | None = None,
                 lora: dict | None = None):
        self.cfg, self.model, self.layout, self.device, self.dtype = cfg, model, layout, device, dtype
        self.text = text  # text "ids": the frozen tower the captions' ids go through
        self.lora = lora  # a LoRA run: its base's identity and adapter settings (training/lora.py `record`)
        self.world = world
        self.reader = ShardReader(dataset, lanes=layout.lanes, rank=rank, world_size=world,
                                  lane_batch=layout.lane_batch, accum=layout.accum, window_rows=cfg.data.window_rows,
                                  seed=cfg.data.seed, workers=cfg.data.workers, prefetch=cfg.data.prefetch,
                                  default_aesthetic=cfg.data.default_aesthetic, pin_memory=device.type == "cuda")
        self.empty = {k: torch.as_tensor(v).to(device) for k, v in empty.items()} if empty else None
        self.grid = token_grid(model)

    def param_groups(self, weight_decay: float) -> list[dict]:
        return param_groups(self.model, weight_decay)

    def begin_step(self, step: int) -> None:
        lay, obj = self.layout, self.cfg.objective
        self.masks = draw_masks(self.cfg.seed, step, lay.lanes, lay.lane_batch * lay.accum, self.grid,
                                obj.rect_mask_prob, obj.cond_drop_prob)
        self.scale = self.world * lay.accum / max(1, self.masks.total_masked())

    def micro_step(self, engine, step: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = slice(k * self.layout.lane_batch, (k + 1) * self.layout.lane_batch)
        masked, drop = self.masks.micro(self.reader.lanes, rows)
        batch = next(self.reader)
        if self.text is not None:
            batch = _with_text_states(self.text, batch)
        parts = _forward(engine, batch, masked, drop, self.empty, self.dtype, self.device,
                         self.cfg.objective.label_smoothing, self.scale)
        stats = torch.stack([parts.ce_sum.double(), parts.correct.double(),
                             torch.tensor(parts.count, dtype=torch.float64, device=self.device)])
        return parts.loss, stats

    def metrics(self, stats: list[float], samples: int, elapsed: float) -> dict:
        ce, correct, count = stats
        return {"loss": ce / count if count else None, "masked_accuracy": correct / count if count else None,
                "tokens_per_s": samples * self.grid[0] * self.grid[1] / elapsed}

    def after_update(self, engine, step: int) -> dict:
        return {}

    def state_dict(self) -> dict:
        return {"reader": self.reader.state_dict(), "lanes": self.layout.lanes,
                **({"lora": self.lora} if self.lora else {})}

    def load_state_dict(self, state: dict) -> None:
        self.reader.load_state_dict(state["reader"])

    def epoch(self) -> int:
        return self.reader.epoch

    def close(self) -> None:
        self.reader.close()


def start(cfg: TrainConfig, device: torch.device, dtype: torch.dtype) -> tuple[UViTTask, TrainState | None]:
    """Every rank: the start-up checks, the model and the task, and the state to resume
    from (None for a fresh run). A resumed run keeps the lanes it started with."""
    rank, world = dist.get_rank(), dist.get_world_size()
    info = rank0_decides(_inspect_run, cfg)
    dataset, resume = info["dataset"], resume_state(cfg.run_dir)
    lanes = resume.task["lanes"] if resume else (cfg.data.lanes or world)
    if resume and cfg.data.lanes and cfg.data.lanes != lanes:
        raise ValueError(f"data.lanes={cfg.data.lanes} but the run was started with {lanes} lanes")
    if resume:
        check_same(resume.task.get("lora"), info["lora"], f"the run in {cfg.run_dir}")
    layout = Layout.plan(cfg.data.global_batch_size, cfg.data.micro_batch_size, world, lanes)

    seed_all(cfg.seed, rank)
    model = build_model(cfg.model.preset, cfg.model.pretrained)
    _check_model(model, dataset.spec)
    if cfg.lora.enabled:  # before the text tower, as the U-ViT: the same draws in both text modes
        apply_lora(model, cfg.lora)
    text, empty = None, info["empty"]
    if dataset.spec.text == "ids":
        # After the U-ViT is built, so that its initialisation draws the same numbers in both modes.
        text = TextEncoder.from_pretrained(cfg.model.text_encoder, device=device, dtype=dtype)
        empty = {k: v[0] for k, v in _half(text.encode([""])).items()}
    if rank == 0:
        write_config(cfg.run_dir, cfg)
    if cfg.model.activation_checkpointing:
        enable_activation_checkpointing(model)
    if cfg.model.compile:
        compile_transformer_blocks(model)
    return UViTTask(cfg, model, dataset, layout, rank, world, device, empty, dtype, text, info["lora"]), resume


def _check_identity(what: str, configured: str | None, subfolders: tuple[str, ...], recorded) -> None:
    if configured is None:
        return
    mine = ModelIdentity.of(configured, subfolders)
    if mine.sha256 != recorded.sha256:
        raise ValueError(f"model.{what} = {configured} is not the model the token dataset was made with "
                         f"(the manifest names {recorded.path}, sha256 {recorded.sha256[:12]}...; this folder "
                         f"hashes to {mine.sha256[:12]}...)")


def _inspect_run(cfg: TrainConfig) -> dict:
    """Rank 0: the dataset (its manifest read once, for every rank), the tokenizer
    identities, the empty prompt and, for a LoRA run, its base's identity (hashed once)."""
    try:
        dataset = TokenDataset(cfg.data.dataset)
    except FileNotFoundError:
        raise ValueError(f"data.dataset: no token dataset at {cfg.data.dataset} ({MANIFEST} missing)") from None
    spec = dataset.spec
    if spec.text == "ids" and cfg.model.text_encoder is None:
        raise ValueError(f"model.text_encoder is required: {cfg.data.dataset} stores caption token ids (text: ids), "
                         "which training runs through the CLIP text tower the dataset was made with")
    _check_identity("vqgan", cfg.model.vqgan, VQGAN_SUBFOLDERS, spec.image_tokenizer)
    _check_identity("text_encoder", cfg.model.text_encoder, (), spec.text_encoder)
    lora = record(cfg.lora, base_identity(cfg.model.pretrained)) if cfg.lora.enabled else None
    if spec.text == "ids":  # every rank computes the empty prompt with the tower it loads
        return {"dataset": dataset, "empty": None, "lora": lora}
    empty = read_empty_prompt(cfg.data.dataset)
    if empty is None and cfg.objective.cond_drop_prob > 0:
        if cfg.model.text_encoder is None:
            raise ValueError(f"objective.cond_drop_prob > 0 needs the empty prompt's embeddings: {cfg.data.dataset} "
                             f"has no {EMPTY_PROMPT}; set model.text_encoder")
        out = TextEncoder.from_pretrained(cfg.model.text_encoder, device="cpu").encode([""])
        empty = {"hidden_states": out.hidden_states[0].half().numpy(), "pooled": out.pooled[0].half().numpy()}
    return {"dataset": dataset, "empty": empty, "lora": lora}


def _check_model(model, spec) -> None:
    grid = token_grid(model)
    problems = []
    if tuple(spec.token_grid) != grid:
        problems.append(f"token grid {tuple(spec.token_grid)} in the dataset, {grid} in the model")
    if spec.codebook_size != model.config.codebook_size:
        problems.append(f"codebook {spec.codebook_size} in the dataset, {model.config.codebook_size} in the model")
    if spec.text_hidden_size != model.config.encoder_hidden_size:
        problems.append(f"text hidden size {spec.text_hidden_size} vs encoder_hidden_size "
                        f"{model.config.encoder_hidden_size}")
    if spec.text_pooled_dim != model.config.cond_embed_dim:
        problems.append(f"pooled text size {spec.text_pooled_dim} vs cond_embed_dim {model.config.cond_embed_dim}")
    if problems:
        raise ValueError("the token dataset does not fit model.preset/model.pretrained: " + "; ".join(problems))


def _half(emb: TextEmbeddings) -> dict[str, torch.Tensor]:
    """The text conditions in float16, what a "states" dataset stores (through float32, as pretokenize rounds)."""
    return {"hidden_states": emb.hidden_states.float().half(), "pooled": emb.pooled.float().half()}


def _with_text_states(text: TextEncoder, batch: dict) -> dict:
    """A text "ids" micro-batch with the tower's outputs for its ids in place of them."""
    states = _half(text.encode_ids(batch["text_ids"]))
    rest = {k: v for k, v in batch.items() if k != "text_ids"}
    return {**rest, "text_hidden_states": states["hidden_states"], "text_pooled": states["pooled"]}


def _forward(engine, batch: dict, masked: torch.Tensor, drop: torch.Tensor, empty: dict | None, dtype,
             device, label_smoothing: float, scale: float) -> LossParts:
    """One micro-batch: mask, swap dropped captions for the empty prompt, run, score."""
    # Pinned on CUDA (the reader): the copies run while the CPU goes on queueing the step.
    batch = {n: t.to(device, non_blocking=True) for n, t in batch.items()}
    hidden, pooled = batch["text_hidden_states"], batch["text_pooled"]
    if drop.any():  # asked of the CPU tensor: no wait for the GPU
        drop = drop.to(device)
        hidden = torch.where(drop[:, None, None], empty["hidden_states"], hidden)
        pooled = torch.where(drop[:, None], empty["pooled"], pooled)
    masked = masked.to(device)
    tokens = batch["image_tokens"]
    logits = engine(tokens.masked_fill(masked, mask_id(engine.module)), hidden.to(dtype), pooled.to(dtype),
                    batch["micro_conds"])
    return masked_loss(logits, tokens, masked, label_smoothing, scale)


def train(cfg: TrainConfig, launcher_holds_lock: bool = False) -> TrainResult:
    """Trains (or resumes) the U-ViT run; `launcher_holds_lock`: the process that started
    the ranks holds RUN_DIR/train.lock (Ray Train's driver), so rank 0 does not take it."""
    if launcher_holds_lock:
        return in_process_group(_train, cfg)
    return in_process_group(locked, cfg.run_dir, _train, cfg)


def _train(cfg: TrainConfig) -> TrainResult:
    with kernels(cfg.deterministic, cfg.engine.threads):
        device = current_device()
        bf16 = wants_bf16(cfg.engine.precision, device)
        task, resume = start(cfg, device, torch.bfloat16 if bf16 else torch.float32)
        universal = resume is not None and resume.world_size != dist.get_world_size()
        return run_loop(cfg, task, resume, universal, device, bf16)
