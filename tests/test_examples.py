"""The YAML examples in examples/ run from the CLI (shortened)."""
from __future__ import annotations

import json

from helpers import DATA, ROOT


def test_adalora_example_config_runs_from_the_cli(tmp_path):
    import yaml

    from deltatune.cli import main

    config = yaml.safe_load((ROOT / "examples" / "sst2_adalora.yaml").read_text())
    sst2 = DATA / "glue" / "SST-2"
    config["data"].update(train=str(sst2 / "train.tsv"), eval=str(sst2 / "dev.tsv"), max_train_rows=96,
                          max_eval_rows=32)
    config["method"].update(t_init=1, t_final=2, delta_t=1)
    config["train"].update(batch_size=16, max_steps=6, eval_every=None, progress=False)
    config["output_dir"] = str(tmp_path / "out")
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    assert main(["train", str(tmp_path / "run.yaml")]) == 0
    saved = json.loads((tmp_path / "out" / "adapter" / "adapter_config.json").read_text())
    ranks = {m: v["r"] for m, v in saved["modules"].items() if v["structure"] == "gated_svd"}
    assert len(ranks) == 37 and sum(ranks.values()) == 8 * 37  # every `dense` matches, the pooler's too
    logged = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["rank"] for r in logged if "rank" in r][-1] == 8 * 37
    assert main(["inspect", str(tmp_path / "out" / "adapter"), "--plot", str(tmp_path / "ranks.png")]) == 0
    assert (tmp_path / "ranks.png").stat().st_size > 1000


def test_s2ft_example_config_runs_from_the_cli_and_exports(tmp_path, capsys):
    """The GSM8K example on SmolLM2 (gradient selection from the first training batches), shortened; then the
    exported PEFT LoRA loads in PEFT and approximates the adapter."""
    import json as _json

    import yaml

    from deltatune.cli import main

    config = yaml.safe_load((ROOT / "examples" / "gsm8k_s2ft.yaml").read_text())
    config["data"].update(train=str(DATA / "gsm8k" / "train.jsonl"), eval=str(DATA / "gsm8k" / "test.jsonl"),
                          max_train_rows=16, max_eval_rows=4, max_length=96)
    config["train"].update(batch_size=4, max_steps=2, eval_every=None, progress=False)
    config["output_dir"] = str(tmp_path / "out")
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    assert main(["train", str(tmp_path / "run.yaml")]) == 0
    saved = _json.loads((tmp_path / "out" / "adapter" / "adapter_config.json").read_text())
    assert saved["method"]["selection"] == "gradient"
    assert {s["structure"] for s in saved["modules"].values()} == {"sliced"}
    assert main(["export", str(tmp_path / "out" / "adapter"), "--to", "peft", str(tmp_path / "peft")]) == 2
    assert main(["export", str(tmp_path / "out" / "adapter"), "--to", "peft", "--rank", "8",
                 str(tmp_path / "peft")]) == 0
    assert "truncated SVD; relative error mean" in capsys.readouterr().out
    peft_cfg = _json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert peft_cfg["peft_type"] == "LORA" and peft_cfg["r"] == 8
