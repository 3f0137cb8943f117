"""LoRA's config refusals (training/config.py): at parse time, one line naming the key."""

import pytest

from amused.training.config import parse_config

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("over, message", [
    ({"lora": {"enabled": True}, "model": {"preset": "tiny"}}, "lora.enabled needs model.pretrained"),
    ({"lora": {"text_encoder": True}}, "lora.text_encoder: adapting the CLIP text tower is not supported"),
    ({"lora": {"rank": 0}}, "lora.rank must be >= 1"),
])
def test_lora_config_refusals(over, message):
    cfg = {"run_dir": "/tmp/x", "steps": 1, "data": {"dataset": "/tmp/t", "global_batch_size": 8}, **over}
    with pytest.raises(ValueError, match=message):
        parse_config(cfg)
