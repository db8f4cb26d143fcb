"""A spec is validated without torch, timm or torchvision (so a typo is refused at once), and the
kind registry that validation reads agrees with the methods a run uses.

The import checks run in a fresh interpreter: this test process has torch loaded already.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from jobs.config import config_class, training_kinds
from jobs.methods import method_class

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "timm", "torchvision")
TINY = "{arch: vit_tiny_patch16_224, img_size: 32, patch_size: 4, depth: 2, embed_dim: 64, num_heads: 4}"

# every stage kind: prep, each built-in training kind, teacher_outputs (with a cached distill) and eval
EVERY_KIND = textwrap.dedent(f"""\
    name: kinds
    storage: STORAGE
    stages:
      - {{name: data, kind: prep, source: ./images, shard_size: 20}}
      - {{name: mae, kind: mae, data: data, model: {TINY}}}
      - {{name: dino, kind: dino, data: data, init: mae, model: {TINY}, peft: {{lora: {{rank: 4}}}}}}
      - {{name: ibot, kind: ibot, data: data, model: {TINY}}}
      - {{name: ft, kind: finetune, data: data, init: mae}}
      - {{name: targets, kind: teacher_outputs, data: data, teacher: ft, img_size: 32, temperature: 4.0}}
      - {{name: student, kind: distill, data: data, targets: cached, cache: targets, epochs: 1,
         model: {{arch: resnet18, img_size: 32}}, loss: {{temperature: 4.0}}}}
      - {{name: report, kind: eval, data: data, models: [mae, dino, ibot, ft, student], dense: {{}}}}
    """)


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=300)


def test_parsing_and_planning_a_spec_of_every_kind_imports_no_torch_timm_or_torchvision(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text(EVERY_KIND.replace("STORAGE", str(tmp_path / "runs")))
    code = textwrap.dedent(f"""\
        import json, sys
        import pipeline._dryrun, pipeline._plan
        from pipeline.spec import dump_spec, load_spec
        spec = load_spec({str(path)!r}, ["stages.mae.epochs=2"])
        assert [s.kind for s in spec.stages][1:5] == ["mae", "dino", "ibot", "finetune"], spec.stages
        pipeline._plan.plan_run(spec)  # a new run: reads the store only
        dump_spec(spec)
        print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in {HEAVY!r})))
        """)
    out = run_python(code)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_vitforge_validate_refuses_a_typo_with_its_line_and_never_imports_torch(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text(EVERY_KIND.replace("STORAGE", str(tmp_path / "runs")).replace("kind: mae, data: data,",
                                                                         "kind: mae, data: data, epochz: 2,"))
    out = subprocess.run([sys.executable, "-X", "importtime", "-m", "pipeline.cli", "validate", str(path)],
                         cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "stages[1] (mae) > epochz (line 5): Extra inputs are not permitted; did you mean 'epochs'?" in out.stderr
    imported = {line.rsplit("|", 1)[-1].strip().split(".")[0] for line in out.stderr.splitlines()
                if line.startswith("import time:")}
    assert "pydantic" in imported  # the import log is there (the check below could not pass by its absence)
    assert not imported & set(HEAVY), sorted(imported & set(HEAVY))
    assert not (tmp_path / "runs").exists()


def test_every_registered_kind_has_its_config_and_its_method_linked():
    assert training_kinds()[:5] == ("mae", "dino", "ibot", "distill", "finetune")
    for kind in training_kinds():
        method = method_class(kind)
        assert config_class(kind) is method.Config and method.kind == kind
