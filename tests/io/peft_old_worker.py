"""Run under another transformers + PEFT (PYTHONPATH=<folder>): load a PEFT LoRA export on MiniLM, both as
``PeftModel.from_pretrained`` and as transformers' ``model.load_adapter``, and write the logits.

    python peft_old_worker.py BASE_DIR ADAPTER_DIR INPUTS.safetensors OUT_DIR

Writes ``OUT_DIR/peft.safetensors``, ``OUT_DIR/hf.safetensors`` and ``OUT_DIR/info.json`` (versions and the
warnings raised while loading). Imports nothing from deltatune."""
import json
import sys
import warnings
from pathlib import Path

import peft
import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers import AutoModelForSequenceClassification

torch.set_num_threads(1)
base, adapter, inputs, out = sys.argv[1:5]
out = Path(out)
batch = load_file(inputs)


def fresh():
    torch.manual_seed(7)  # a head different from the adapter's: the saved head must replace it
    return AutoModelForSequenceClassification.from_pretrained(base, num_labels=2).eval()


caught = []
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    ref = peft.PeftModel.from_pretrained(fresh(), adapter).eval()
    hf = fresh()
    hf.load_adapter(adapter)
    hf.eval()
    caught = [str(x.message) for x in w]
with torch.no_grad():
    save_file({"logits": ref(**batch).logits.contiguous()}, str(out / "peft.safetensors"))
    save_file({"logits": hf(**batch).logits.contiguous()}, str(out / "hf.safetensors"))
(out / "info.json").write_text(json.dumps({"peft": peft.__version__, "transformers": transformers.__version__,
                                           "torch": torch.__version__, "warnings": caught}))
