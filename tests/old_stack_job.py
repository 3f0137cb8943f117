"""Run inside a throwaway virtualenv of an older diffusers/transformers (tests/test_export_old_stack.py):
opens an exported folder the way a user of that stack does and saves what it got.

    python old_stack_job.py SETTINGS.json OUT.npz

SETTINGS: {"folder", "prompts", "captions", "seed", "steps", "guidance_scale", "variant"}. OUT: the
pipeline's images, the token ids of the captions from the slow CLIPTokenizer and from
CLIPTokenizerFast, the stack's versions, the dtype the variant loaded in. Imports only that stack.
"""

import json
import sys

import diffusers
import numpy as np
import torch
import transformers
from diffusers import AmusedPipeline
from transformers import CLIPTokenizer, CLIPTokenizerFast


def main(settings_path: str, out: str) -> None:
    s = json.loads(open(settings_path).read())
    folder = s["folder"]
    slow = CLIPTokenizer.from_pretrained(f"{folder}/tokenizer")
    fast = CLIPTokenizerFast.from_pretrained(f"{folder}/tokenizer")
    assert not slow.is_fast and fast.is_fast, (type(slow), type(fast))

    def ids(tokenizer):
        return np.array(tokenizer(s["captions"], padding="max_length", truncation=True, max_length=77).input_ids)

    pipe = AmusedPipeline.from_pretrained(folder)
    assert type(pipe.tokenizer).__name__ == "CLIPTokenizer" and not pipe.tokenizer.is_fast  # what model_index names
    images = pipe(s["prompts"], num_inference_steps=s["steps"], guidance_scale=s["guidance_scale"],
                  generator=torch.Generator().manual_seed(s["seed"]), output_type="np").images
    half = AmusedPipeline.from_pretrained(folder, variant=s["variant"], torch_dtype=torch.float16)
    np.savez(out, images=np.round(np.asarray(images) * 255).astype(np.uint8), slow_ids=ids(slow), fast_ids=ids(fast),
             variant_dtype=str(next(half.transformer.parameters()).dtype),
             versions=json.dumps({"diffusers": diffusers.__version__, "transformers": transformers.__version__,
                                  "torch": torch.__version__}))


if __name__ == "__main__":
    main(*sys.argv[1:])
