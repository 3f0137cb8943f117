"""Memory of aMUSEd-256 fine-tuning: full with AdamW, full with 8-bit AdamW
(`optim.name: adamw8bit`, bitsandbytes), and LoRA (rank 16 on to_q/to_k/to_v/to_out.0,
`training/lora.py apply_lora`), all at the aMUSEd-256 architecture with random weights.

On CUDA: the peak of torch.cuda.max_memory_allocated (and max_memory_reserved) over
`--steps` optimizer steps of batch 1 x 16 gradient accumulation, as diffusers'
examples/amused/train_amused.py runs it and against its published figures (256 px,
batch 1 x 16: 8-bit Adam 10.7 GB, LoRA 6.5 GB; fp16 mixed precision, gradient
checkpointing): fp32 master weights, autocast in fp16 (with a GradScaler) or bf16, our
activation checkpointing of the transformer layers, and the frozen text tower
(CLIP-L/14-sized, random) run on every micro-batch in the autocast dtype, as the public
script does. The model runs directly, not under DeepSpeed (the public script is a
single-GPU accelerate loop). Image tokens are random (our training reads pre-tokenized
shards; the public script also holds the VQ-GAN, about 0.1 GB in fp16, and encodes each
image, which this leaves out).

Everywhere (what the CPU can measure): optimizer-state bytes and trainable parameters
of each setup, each as a ratio against AdamW's in the same run. The states are measured
tensor by tensor on the run's device (the model is built on the meta device; each trainable tensor
is stepped once alone with its own weight-decay group), so memory stays at the largest
tensor's; bitsandbytes quantizes per tensor, so the sum is the whole model's state.

    python benchmarks/finetune_memory.py                                   # CPU: state bytes, parameters
    python benchmarks/finetune_memory.py --device cuda --precision fp16    # GPU: peak memory too
"""

from __future__ import annotations

import argparse
import gc
import os
import time

import torch
from transformers import CLIPTextConfig, CLIPTextModelWithProjection

from amused.tokenizer.presets import CLIP_TEXT_COMMON, CLIP_TEXT_CONFIGS
from amused.training.config import LoraConfig, OptimConfig
from amused.training.lora import apply_lora
from amused.training.optim import build_optimizer
from amused.training.uvit.model import build_model, enable_activation_checkpointing, mask_id, param_groups
from amused.training.uvit.objective import masked_loss

PRESET = "amused-256"
SETUPS = ("adamw", "adamw8bit", "lora")
# diffusers' examples/amused README, amused-256, batch 1 x 16 accumulation ("Memory Used").
PUBLIC_GB = {"adamw8bit": 10.7, "lora": 6.5}
WEIGHT_DECAY = 0.01


def setup_model(setup: str, device: torch.device | str) -> tuple[torch.nn.Module, OptimConfig]:
    """The U-ViT of one setup (its trainable parameters marked) and its optimizer config."""
    with torch.device(device):
        model = build_model(PRESET)
    if setup == "lora":
        apply_lora(model, LoraConfig())
    return model, OptimConfig(name="adamw8bit" if setup == "adamw8bit" else "adamw", lr=1e-5, warmup_steps=0,
                              weight_decay=WEIGHT_DECAY)


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the tensors an optimizer keeps per parameter (moments, scales, maps)."""
    return sum(t.numel() * t.element_size() for state in optimizer.state.values()
               for t in state.values() if torch.is_tensor(t) and t.ndim)


def measure_states(setup: str, device: str) -> tuple[int, int]:
    """(trainable parameters, optimizer-state bytes), each trainable tensor stepped once
    alone on `device` (the model itself stays on the meta device)."""
    model, optim = setup_model(setup, "meta")
    total_params = total_bytes = 0
    for group in param_groups(model, WEIGHT_DECAY):
        for meta in group["params"]:
            param = torch.nn.Parameter(torch.zeros(meta.shape, device=device))
            param.grad = torch.randn(meta.shape, device=device)
            optimizer = build_optimizer(optim, [{"params": [param], "weight_decay": group["weight_decay"]}])
            optimizer.step()
            total_params += param.numel()
            total_bytes += state_bytes(optimizer)
    return total_params, total_bytes


def train_steps(setup: str, device: torch.device, dtype: torch.dtype, steps: int, accum: int,
                seed: int = 0) -> torch.optim.Optimizer:
    """One setup trained for `steps` x `accum` micro-batches of 1, as the public script
    does (see above); gives its optimizer."""
    torch.manual_seed(seed)
    text = CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_TEXT_COMMON, **CLIP_TEXT_CONFIGS["amused"]))
    text = text.to(device, dtype).requires_grad_(False).eval()
    model, optim = setup_model(setup, device)
    enable_activation_checkpointing(model)
    model.train()
    optimizer = build_optimizer(optim, param_groups(model, WEIGHT_DECAY))
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    side, codebook = model.config.sample_size, model.config.codebook_size
    micro_conds = torch.tensor([[256.0, 256.0, 0.0, 0.0, 6.0]], device=device)
    for _ in range(steps):
        for _ in range(accum):
            tokens = torch.randint(0, codebook, (1, side, side), device=device)
            masked = torch.rand(1, side, side, device=device) < 0.5
            with torch.no_grad():
                out = text(torch.randint(0, CLIP_TEXT_COMMON["vocab_size"], (1, 77), device=device),
                           output_hidden_states=True)
            with torch.autocast(device.type, dtype=dtype):
                logits = model(tokens.masked_fill(masked, mask_id(model)), out.hidden_states[-2], out.text_embeds,
                               micro_conds)
            loss = masked_loss(logits, tokens, masked, 0.0, 1.0 / (accum * max(1, int(masked.sum())))).loss
            scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
    return optimizer


def peak_memory(setup: str, dtype: torch.dtype, steps: int, accum: int) -> dict:
    """`train_steps` on CUDA: peak bytes (allocated, reserved), seconds per optimizer
    step and the optimizer's state bytes."""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    optimizer = train_steps(setup, torch.device("cuda"), dtype, steps, accum)
    torch.cuda.synchronize()
    result = {"allocated": torch.cuda.max_memory_allocated(), "reserved": torch.cuda.max_memory_reserved(),
              "s_per_step": (time.perf_counter() - started) / steps, "state_bytes": state_bytes(optimizer)}
    del optimizer
    gc.collect()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--precision", choices=("fp16", "bf16"), default="fp16",
                        help="CUDA autocast dtype (the public figures are fp16 mixed precision)")
    parser.add_argument("--steps", type=int, default=3, help="CUDA: optimizer steps per setup")
    parser.add_argument("--accum", type=int, default=16, help="CUDA: micro-batches of 1 per optimizer step")
    parser.add_argument("--setups", nargs="+", choices=SETUPS, default=list(SETUPS))
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({os.cpu_count()} cores)"
    print(f"{PRESET} (random weights), {where}, torch {torch.__version__}")

    counted = {setup: measure_states(setup, args.device) for setup in args.setups}
    base_params, base_bytes = counted.get("adamw", next(iter(counted.values())))
    base = "adamw" if "adamw" in counted else args.setups[0]
    print(f"\n{'setup':<10} {'trainable':>14} {'vs ' + base:>9} {'state bytes':>15} {'vs ' + base:>9}")
    for setup, (params, nbytes) in counted.items():
        print(f"{setup:<10} {params:>14,} {params / base_params:>9.4f} {nbytes:>15,} {nbytes / base_bytes:>9.4f}")

    if args.device != "cuda":
        return
    dtype = torch.float16 if args.precision == "fp16" else torch.bfloat16
    print(f"\nCUDA, {args.precision} autocast, batch 1 x {args.accum} accumulation, {args.steps} steps per setup")
    print(f"{'setup':<10} {'peak alloc GiB':>14} {'reserved GiB':>12} {'public GB':>10} {'s/step':>8} "
          f"{'state GiB':>9}")
    for setup in args.setups:
        r = peak_memory(setup, dtype, args.steps, args.accum)
        public = f"{PUBLIC_GB[setup]:.1f}" if setup in PUBLIC_GB else "-"
        print(f"{setup:<10} {r['allocated'] / 2**30:>14.2f} {r['reserved'] / 2**30:>12.2f} {public:>10} "
              f"{r['s_per_step']:>8.2f} {r['state_bytes'] / 2**30:>9.3f}")


if __name__ == "__main__":
    main()
