"""The package as a whole: README references, import order, public names, callable modules."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap

import pytest
from helpers import ROOT, make_minilm

import deltatune as dt


README = ROOT / "README.md"


def _fresh_python(code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a new interpreter with this checkout's ``src`` first on the path (import order matters)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
                          timeout=300)


# -- B13: public names and module paths ---------------------------------------------------------------------------
def readme_references() -> list[str]:
    """Every ``dt.<name>`` / ``deltatune.<a>.<b>`` dotted reference and every ``from deltatune.x import a, b`` name in
    the README (code blocks and inline code)."""
    text = README.read_text()
    refs = {m.group(0).rstrip(".") for m in re.finditer(r"\b(?:dt|deltatune)(?:\.[A-Za-z_]\w*)+", text)}
    for mod, names in re.findall(r"from (deltatune[\w.]*) import ([\w, ()]+)", text):
        refs |= {f"{mod}.{n.split(' as ')[0].strip()}" for n in names.replace("(", "").replace(")", "").split(",")
                 if n.strip()}
    refs |= {f"deltatune.{m}" for m in re.findall(r"import deltatune\.([\w.]+)", text)}
    return sorted(r.replace("dt.", "deltatune.", 1) if r.startswith("dt.") else r for r in refs)


def test_readme_references_resolve_in_a_fresh_interpreter():
    refs = readme_references()
    assert "deltatune.combine.ties" in refs and "deltatune.combine" in refs and len(refs) > 40
    code = f"""
        import importlib, json, deltatune
        bad = []
        for ref in {refs!r}:
            parts = ref.split(".")
            for i in range(2, len(parts) + 1):  # import what a user would import (deltatune.zoo, deltatune.train)
                try:
                    importlib.import_module(".".join(parts[:i]))
                except ImportError:
                    break
            obj = deltatune
            for part in parts[1:]:  # then attribute access from the package, as written in the README
                try:
                    obj = getattr(obj, part)
                except AttributeError as e:
                    bad.append(f"{{ref}}: {{e}}")
                    break
        print(json.dumps(bad))
    """
    proc = _fresh_python(code)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []


@pytest.mark.parametrize("first", ["import deltatune.combine.ops as ops",
                                   "from deltatune.combine import ops",
                                   "import deltatune as dt; import deltatune.combine.ops as ops"])
def test_subpackage_imports_work_in_any_order(first):
    proc = _fresh_python(f"""
        {first}
        import deltatune, deltatune.deltas, deltatune.compress, deltatune.extract, deltatune.interference
        import deltatune.combine.merge
        assert ops.ties is deltatune.combine.ties
        assert deltatune.deltas.LowRankDelta is deltatune.LowRankDelta
        assert deltatune.compress.load_compressed is deltatune.load_compressed
        assert callable(deltatune.combine) and callable(deltatune.deltas) and callable(deltatune.compress)
        print("ok")
    """)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


def test_no_public_name_shadows_a_submodule():
    """Generic: every submodule of the package is reachable as an attribute (a function re-exported under a
    module's name is the module made callable, never a replacement)."""
    proc = _fresh_python("""
        import importlib, pkgutil, sys, deltatune
        bad = []
        for info in pkgutil.walk_packages(deltatune.__path__, "deltatune."):
            if info.name.endswith(("__main__", ".demo", ".cli")):
                continue
            mod = importlib.import_module(info.name)
            parent, _, leaf = info.name.rpartition(".")
            if getattr(sys.modules[parent], leaf) is not mod:
                bad.append(info.name)
        print(bad)
    """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_callable_modules_still_run_their_function(minilm_dir):
    model = make_minilm(minilm_dir)
    dt.attach(model, dt.LoRA(r=2, targets=["query"]), name="a")
    dt.attach(model, dt.LoRA(r=2, targets=["query"]), name="b", activate=False)
    found = dt.deltas(model, "a")
    assert len(found) == 6 and all(isinstance(d, dt.deltas.LowRankDelta) for d in found.values())
    assert dt.deltas is sys.modules["deltatune.deltas"]
    dt.combine(model, ["a", "b"], name="ab")  # the function, called through the module
    assert "ab" in dt.adapters(model)
    assert dt.combine.ties is sys.modules["deltatune.combine.ops"].ties
