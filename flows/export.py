"""`alignflow export`: a stage's model, out of the store, as a folder transformers loads.

A model artifact becomes what `AutoModelForCausalLM.from_pretrained(DIR)` loads, a reward model
what `AutoModelForSequenceClassification.from_pretrained(DIR)` loads; each with its tokenizer
(and chat template), LoRA adapters merged into the weights. The folder is written beside DIR and
renamed into place when whole, so a failed export leaves nothing half-written.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from flows.errors import Problem, SpecError, did_you_mean

EXPORTABLE = ("model", "reward_model")
EXPORT_INFO = "alignflow_export.json"  # where the folder came from


def export_node(spec, nodes, stage: str, round: int | None):
    """The node `stage` (in round `round`; default: the last round of a repeated stage)."""
    named = [n for n in nodes if n.name == stage]
    if not named:
        raise SpecError(Problem(spec.file, stage, f"no model or stage named '{stage}'{did_you_mean(stage, spec.nodes)}"))
    rounds = sorted(n.round for n in named)
    if round is None:
        round = rounds[-1]
    found = [n for n in named if n.round == round]
    if not found:
        which = f"rounds {rounds[0]}..{rounds[-1]}" if rounds[-1] else "no rounds (it runs once)"
        raise SpecError(Problem(spec.file, f"{stage} --round {round}", f"'{stage}' has {which}"))
    node = found[0]
    if spec.nodes[stage].output not in EXPORTABLE:
        raise SpecError(Problem(spec.file, stage, f"'{stage}' outputs a {spec.nodes[stage].output}; "
                                                  f"export writes a model or a reward_model"))
    return node


def export(spec_file: str, stage: str, out: str | Path, round: int | None = None, overwrite: bool = False,
           overrides: list[str] = ()) -> Path:
    """Write stage `stage`'s finished artifact as a from_pretrained folder at `out`.
    SpecError (exit 2, nothing written) for a bad spec or stage, an existing `out` without
    `overwrite`, or a stage with no finished artifact for its current key."""
    from flows.home import store_root
    from flows.keys import resolve
    from flows.spec import load_spec
    from flows.store import Store

    spec = load_spec(spec_file, list(overrides))
    nodes = resolve(spec)
    node = export_node(spec, nodes, stage, round)
    out = Path(out).expanduser().resolve()
    if out.exists() and not (out.is_dir() and not any(out.iterdir())) and not overwrite:
        raise SpecError(Problem(spec_file, "DIR", f"{out} exists and is not empty; pass --overwrite to replace it"))
    store = Store(store_root(spec.store))
    problem = store.check(node.kind, node.key)
    if problem is not None:
        raise SpecError(Problem(spec_file, node.label, f"no finished artifact for its current key {node.key[:12]} "
                                                       f"({problem}): run `alignflow run {spec_file}` first"))
    artifact = store.local_path(node.kind, node.key)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        write_pretrained(artifact, spec.nodes[stage].output, tmp)
        info = {"spec": str(Path(spec_file).resolve()), "stage": stage, "round": node.round, "kind": node.kind,
                "key": node.key, "artifact": str(store.path(node.kind, node.key))}
        (tmp / EXPORT_INFO).write_text(json.dumps(info, indent=2))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def write_pretrained(artifact: Path, output: str, folder: Path) -> None:
    """Load a model or reward_model artifact (adapters merged) and save it as a plain transformers folder."""
    from tasks.models import load_causal_lm, load_reward_model, save_model

    load = load_causal_lm if output == "model" else load_reward_model
    model, tokenizer = load(artifact, device="cpu")
    save_model(model, tokenizer, folder)
