"""The fit's validation table for an exported router artifact, on a fit config's validation data.

``polykv-learn validate`` measures a checkpoint of the current learner; this measures any artifact (e.g. the bundled
``checkpoints/smollm2-135m``) on the same validation prefills, through the same code path: the learner's validation
step with its planner replaced by the artifact's (``PolyKV.planner``, the deployable one). Prints mean KL of the
probe's next-token distributions to the full cache, hard plans, per budget, next to every uniform policy, so two
routers can be compared on one validation set (e.g. the held-out-sources task file of the default config).

    OMP_NUM_THREADS=1 python benchmarks/validate_router.py --config configs/smollm2-135m.yaml \\
        --router checkpoints/smollm2-135m --router runs/smollm2-135m/router
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning as L  # noqa: E402

from polykv_learn.deploy.polykv import PolyKV  # noqa: E402
from polykv_learn.learn.datamodule import PrefillDataModule  # noqa: E402
from polykv_learn.learn.module import PolyKVLearner  # noqa: E402


def validation_table(config: dict, router: str) -> dict[int, dict[str, float]]:
    """``{budget: {method: mean KL}}`` of ``router`` on the validation split of ``config`` (a fit config)."""
    model_args = {k: v for k, v in config["model"].items() if k != "export_dir"}
    learner = PolyKVLearner(**model_args)
    planner = PolyKV.from_pretrained(router).planner
    if list(planner.policies) != list(learner.policies):
        raise SystemExit(f"{router} routes {planner.policies}, the config's learner {learner.policies}")
    learner.learned_planner = lambda: planner  # the artifact's deployable planner in the learner's validation step
    data_args = {k: v for k, v in config["data"].items()}
    dm = PrefillDataModule(**data_args, model_name=learner.hparams.model_name, policies=learner.policies,
                           overlap_policies=learner.hparams.overlap_policies)  # fmt: skip
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False)  # fmt: skip
    trainer.validate(learner, datamodule=dm, verbose=False)
    return learner.validation_table


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/smollm2-135m.yaml", help="fit config (its model and data sections)")
    ap.add_argument("--router", action="append", required=True, help="artifact folder (repeatable)")
    args = ap.parse_args(argv)
    config = yaml.safe_load(Path(args.config).read_text())
    for router in args.router:
        table = validation_table(config, router)
        print(f"\n{router} on the validation split of {args.config}")
        budgets = sorted(table)
        print("| method | " + " | ".join(f"B={b}" for b in budgets) + " |")
        print("|---|" + "---:|" * len(budgets))
        for name in [
            "learned",
            "best_uniform",
            *sorted(n for n in table[budgets[0]] if n not in ("learned", "best_uniform")),
        ]:
            print(f"| {name} | " + " | ".join(f"{table[b][name]:.3f}" for b in budgets) + " |")


if __name__ == "__main__":
    main()
