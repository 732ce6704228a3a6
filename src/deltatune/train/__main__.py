"""``python -m deltatune.train run.yaml`` (or ``torchrun --nproc_per_node N -m deltatune.train run.yaml``)."""
import argparse
import json

from .config import run_config


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m deltatune.train", description="Run a deltatune YAML run config.")
    parser.add_argument("config", help="path to the YAML run config")
    result = run_config(parser.parse_args(argv).config)
    if result["metrics_path"] is not None:  # rank 0
        print(json.dumps({k: result[k] for k in ("steps", "train_loss", "eval", "adapter_path", "time")}, indent=2))


if __name__ == "__main__":
    main()
