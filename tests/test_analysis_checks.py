"""The audit's structure: one AuditSettings (the CLI's defaults are its fields'), checks as a registry run by one loop
(a skip with its reason for a missing need, a setting that turns a check off, or a project error), a check's own
report section, one ModelAdapter per model (random baselines shared by architecture, with the latents a fresh
baseline gives), and UMAP's exact neighbours computed without its parallel argsort (the same embedding)."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from analysis.adapter import ModelAdapter
from analysis.audit import AuditTarget, audit_one
from analysis.checks import (
    NEEDS,
    Check,
    CheckContext,
    ReportSection,
    SkipCheck,
    default_checks,
    register,
    registered,
    resolve_checks,
    run_checks,
)
from analysis.extract import extract
from analysis.html import Table, cell, name_cell, plain_th
from analysis.modules import random_copy
from analysis.report import audit
from analysis.settings import DEMO, AuditSettings, cli_options
from ex2l_xai.data import get_dataset
from ex2l_xai.errors import Ex2lError

ROOT = Path(__file__).resolve().parents[1]


def small_cnn(seed: int, width: int = 8) -> nn.Module:
    """A three-layer CNN whose weights depend on ``seed``."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, width, 3, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 4)).eval()


@pytest.fixture(scope="module")
def ds():
    return get_dataset("synthetic", "test", image_size=32, per_group=4, test_per_group=4)


# ---- settings ------------------------------------------------------------------------------------------------
def test_cli_defaults_are_the_settings_fields() -> None:
    from ex2l_xai.cli import AUDIT_OPTIONS, _settings, build_parser

    args = build_parser().parse_args(["audit", "--out", "x"])
    assert _settings(args, split="test") == AuditSettings()  # every default comes from the field
    args = build_parser().parse_args(["audit", "--out", "x", "--max-samples", "0", "--interventions", "0",
                                      "--rows", "3", "--umap-epochs", "50"])
    s = _settings(args, split="val")
    assert (s.max_samples, s.intervention_samples, s.n_rows, s.umap_epochs, s.split) == (None, 0, 3, 50, "val")
    fields = {f.name: f.default for f in dataclasses.fields(AuditSettings)}
    for opt in cli_options(AUDIT_OPTIONS):
        assert opt.kwargs["default"] == fields[opt.name]
        if fields[opt.name] is not None:
            shown = fields[opt.name]
            shown = ", ".join(shown) if isinstance(shown, tuple) else shown  # a repeatable option's tuple
            assert f"(default {shown}" in opt.kwargs["help"], opt.flag
    # repeatable --cam: the first use replaces the default, later ones add (variants side by side)
    args = build_parser().parse_args(["audit", "--out", "x", "--cam", "hirescam", "--cam", "gradcam++",
                                      "--no-faithfulness", "--faith-steps", "12", "--faith-baseline", "mean"])
    s = _settings(args, split="test")
    assert s.cam_variants == ("hirescam", "gradcam++") and not s.faithfulness
    assert (s.faith_steps, s.faith_baseline, s.faith_samples) == (12, "mean", 64)
    assert s.dump()["cam_variants"] == ["hirescam", "gradcam++"]  # JSON-ready: the demo compares it with audit.json
    for bad in (["--cam", "gradcam3"], ["--faith-steps", "7"]):
        with pytest.raises((SystemExit, Ex2lError)):
            _settings(build_parser().parse_args(["audit", "--out", "x", *bad]), split="test")


def test_settings_are_frozen_and_checked() -> None:
    s = AuditSettings()
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.seed = 3  # type: ignore[misc]
    assert s.replace(seed=3).seed == 3 and s.seed == 0
    with pytest.raises(Ex2lError, match="unknown option.*max_sample"):
        s.replace(max_sample=3)
    with pytest.raises(Ex2lError, match="rule"):
        AuditSettings(rule="best")
    with pytest.raises(Ex2lError, match="max_samples"):
        AuditSettings(max_samples=0)
    assert DEMO.dump()["max_samples"] == 480 and set(DEMO.dump()) == set(fields_of(AuditSettings))


def fields_of(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def test_the_default_max_samples_is_written_once() -> None:
    """2000, 240 and 32 appear as audit defaults in settings.py only (issue 20: no copies in cli.py, report.py,
    audit.py, figures/common.py)."""
    for path in ("ex2l_xai/cli.py", "analysis/report.py", "analysis/audit.py", "figures/common.py",
                 "analysis/paper.py"):
        tree = ast.parse((ROOT / path).read_text())
        numbers = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, int)}
        assert not {2000, 240} & numbers, path


# ---- the registry and the loop -------------------------------------------------------------------------------
def test_default_checks_in_order() -> None:
    names = [c.name for c in default_checks()]
    assert names == ["gradcam", "random_network", "slices", "latent_space", "leakage", "localization", "interventions",
                     "cam_sanity", "faithfulness", "accuracy"]
    assert [c.name for c in resolve_checks(["accuracy", "leakage"])] == ["accuracy", "leakage"]
    with pytest.raises(Ex2lError, match="unknown check 'nope'.*accuracy"):
        resolve_checks(["nope"])


class _Ext:
    """Just enough of an Extraction for the needs: no masks, no CAMs."""

    masks = None
    cams_true = None
    cams_conf = None


def test_run_checks_records_skips_with_their_reasons() -> None:
    ran: list[str] = []

    class NeedsMasks(Check):
        name, needs = "needs_masks", ("masks",)

        def run(self, ctx: CheckContext) -> None:
            ran.append(self.name)

    class Off(Check):
        name = "off"

        def disabled(self, settings: AuditSettings) -> str | None:
            return "turned off" if settings.sanity_samples == 0 else None

        def run(self, ctx: CheckContext) -> None:
            ran.append(self.name)

    class Fails(Check):
        name = "fails"

        def run(self, ctx: CheckContext) -> None:
            raise SkipCheck("no such thing here")

        def skip(self, ctx: CheckContext, reason: str) -> None:
            ctx.entry["fails"] = {"available": False, "reason": reason}

    class Runs(Check):
        name = "runs"

        def run(self, ctx: CheckContext) -> None:
            ctx.entry["value"] = 1.5

    ctx = CheckContext(adapter=None, extraction=_Ext(), env_extraction=None, env_note="", dataset=None,
                       dataset_key="", settings=AuditSettings(sanity_samples=0), entry={"name": "m"})
    timings = run_checks(ctx, [NeedsMasks(), Off(), Fails(), Runs()])
    assert ran == [] and ctx.entry["value"] == 1.5 and set(timings) == {"needs_masks", "off", "fails", "runs"}
    assert ctx.entry["skipped"] == {"needs_masks": NEEDS["masks"], "off": "turned off", "fails": "no such thing here"}
    assert ctx.entry["fails"] == {"available": False, "reason": "no such thing here"}
    with pytest.raises(ZeroDivisionError):  # a bug is not a skip: only project errors are recorded
        run_checks(ctx, [type("Bug", (Check,), {"name": "bug", "run": lambda self, c: 1 / 0})()])


def test_register_refuses_unknown_needs_and_second_names() -> None:
    default_checks()  # the built-in checks registered
    with pytest.raises(Ex2lError, match="unknown need"):
        register(type("Bad", (Check,), {"name": "bad_need", "needs": ("gpu",)}))
    with pytest.raises(Ex2lError, match="registered twice"):
        register(type("Acc2", (Check,), {"name": "accuracy"}))
    with pytest.raises(Ex2lError, match=r"figure key\(s\) \['umap'\] already belong to \['latent_space'\]"):
        register(type("Umap2", (Check,), {"name": "umap_again", "files": {"umap": "mine.png"}}))
    assert "accuracy" in registered() and "umap_again" not in registered()


def test_the_report_figures_are_what_the_checks_declare() -> None:
    """FIGURES is built from each registered check's ``files``: every built-in figure, no file twice."""
    from analysis.checks import figure_files
    from analysis.report import FIGURES

    assert FIGURES == figure_files()
    assert FIGURES["faithfulness"] == "fig8_faithfulness.png" and FIGURES["umap_env"] == "fig3_umap_env.png"
    assert set(FIGURES) == {"gradcam_grid", "gradcam_disagreement", "umap", "umap_env", "interventions",
                            "cam_sanity", "slices", "spuriosity", "faithfulness"}
    assert len(set(FIGURES.values())) == len(FIGURES)


class _ConfidenceCheck(Check):
    """A new check as a user writes it: numbers into the entry, and a report section of its own."""

    name = "mean_confidence"
    order = 90

    def run(self, ctx: CheckContext) -> None:
        logits = torch.as_tensor(ctx.extraction.logits)
        ctx.entry["mean_confidence"] = float(logits.softmax(1).max(1).values.mean())

    def skip(self, ctx: CheckContext, reason: str) -> None:
        ctx.entry["mean_confidence"] = None

    def section(self, data: dict) -> ReportSection:
        t = Table([plain_th("Model"), plain_th("Mean confidence")])
        for r in data["runs"]:
            t.rows.append([name_cell(r["name"]), cell(r["mean_confidence"])])
        return ReportSection("confidence", "Confidence", "Mean top-1 softmax probability.", t)


def test_a_new_check_is_one_class_with_its_section(ds, tmp_path: Path) -> None:
    models = [AuditTarget(small_cnn(s), name=f"cnn{s}", dataset=ds) for s in (0, 1)]
    res = audit(models, tmp_path, checks=["accuracy", _ConfidenceCheck()], max_samples=None, quiet=True)
    x = torch.stack([ds[i]["image"] for i in range(len(ds))])
    html = (tmp_path / "report.html").read_text()
    for seed, entry in zip((0, 1), res["runs"], strict=True):
        with torch.no_grad():
            expected = float(small_cnn(seed)(x).softmax(1).max(1).values.mean())
        assert entry["mean_confidence"] == pytest.approx(expected, rel=1e-5)
        assert f"{100 * entry['mean_confidence']:.1f}%" in html  # the section shows audit.json's number
        assert "latent_space" not in entry["seconds"] and entry["metrics_source"] == "audit sample"
    assert res["settings"]["checks"] == ["accuracy", "mean_confidence"]
    assert '<section id="confidence"><h2>Confidence</h2>' in html and 'href="#confidence"' in html


def test_checks_never_ask_what_the_model_is() -> None:
    """The model's type is the adapter's business: no check, nor the audit loop, names a model class."""
    paths = [*sorted((ROOT / "analysis" / "checks").glob("*.py")), ROOT / "analysis" / "audit.py",
             ROOT / "analysis" / "report.py", ROOT / "analysis" / "sanity.py", ROOT / "analysis" / "extract.py"]
    for path in paths:
        tree = ast.parse(path.read_text())
        names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
        names |= {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
        names |= {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
        for word in ("TwoHeadNet", "ScriptModule", "ScriptedClassifier", "scripted_of", "two_head_net", "scripted"):
            assert word not in names, f"{path.name} uses {word}"


# ---- the adapter ---------------------------------------------------------------------------------------------
def test_adapter_kinds_and_layers(ds) -> None:
    from ex2l_xai.models import TwoHeadNet

    x = torch.stack([ds[i]["image"] for i in range(2)])
    cnn = ModelAdapter(small_cnn(0))
    cnn.bind(x)
    # the last spatial map the logits depend on: the second ReLU, which the pooling reads
    assert cnn.kind == "module" and cnn.layer_path == "3" and cnn.latent.description == "input of 6"
    assert not cnn.has_confounder_head and cnn.recomputable_cams is None
    torch.manual_seed(0)
    net = TwoHeadNet("resnet18", 4, 3, width=8, cam_layer="layer3").eval()
    two = ModelAdapter(net)
    two.bind(x)
    assert two.kind == "two_head" and two.has_confounder_head and two.layer_path == "backbone.layer3"
    out = two.batch(x, torch.tensor([0, 1]), torch.tensor([2, 0]), cams=True)
    assert out["cams_conf"].shape == out["cams_true"].shape and out["conf_logits"].shape == (2, 3)
    import torchvision

    with pytest.warns(FutureWarning):
        script = torch.jit.script(torchvision.models.resnet18(num_classes=4).eval())
    scripted = ModelAdapter(script)
    scripted.bind(x)
    assert scripted.kind == "torchscript" and scripted.layer_path == "layer3"  # layer4 is 1x1 at 32 px
    with pytest.raises(Ex2lError, match="bind"):
        _ = ModelAdapter(small_cnn(0)).layer_path
    assert ModelAdapter(small_cnn(0), forward_fn=lambda t: t).recomputable_cams is not None


def test_random_baselines_are_shared_by_architecture(ds) -> None:
    """Two trained models of one architecture have the same random baseline (random_copy re-initialises every
    layer from the seed): it is extracted once, and the leakage probes read the latents a fresh baseline gives."""
    x = torch.stack([ds[i]["image"] for i in range(2)])
    a, b, wide = (ModelAdapter(m) for m in (small_cnn(0), small_cnn(1), small_cnn(0, width=16)))
    prints = []
    for ad in (a, b, wide):
        ad.bind(x)
        rnd = ad.random_baseline(0)
        rnd.bind(x)
        prints.append(rnd.latent_fingerprint())
    assert prints[0] == prints[1] != prints[2]
    own = ModelAdapter(small_cnn(0), latent_fn=lambda t: t.mean((2, 3)))
    own.bind(x)
    assert own.latent_fingerprint() is None  # a user's callable: never shared
    shared: dict = {}
    entries = [audit_one(AuditTarget(small_cnn(s), name=f"cnn{s}", dataset=ds), checks=["random_network", "leakage"],
                         shared=shared, max_samples=None).entry for s in (0, 1)]
    assert len(shared["random_latents"]) == 1  # one extraction for both models
    fresh = extract(random_copy(small_cnn(1), 0), ds, cams=False).latents
    shared = extract(random_copy(small_cnn(0), 0), ds, cams=False).latents
    np.testing.assert_array_equal(fresh, shared)  # what makes the sharing exact
    from analysis.probes import leakage

    ext = extract(small_cnn(1), ds, cams=False)
    direct = leakage(ext.latents, ext.labels, ext.confounders, logits=ext.logits, random_latents=fresh, seed=0)
    assert entries[1]["leakage"]["random_within_label_acc"] == direct["random_within_label_acc"]
    assert entries[1]["leakage"]["random"]["confounder"] == direct["random"]["confounder"]


# ---- UMAP ----------------------------------------------------------------------------------------------------
def test_exact_knn_gives_umaps_own_embedding() -> None:
    import warnings

    import umap

    from analysis.embeddings import embed, exact_knn

    z = np.random.default_rng(0).normal(size=(120, 16))
    mine = embed(z, seed=0, n_epochs=30, n_neighbors=10, standardize=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = umap.UMAP(n_components=2, n_neighbors=10, n_epochs=30, random_state=0, init="spectral").fit_transform(z)
    np.testing.assert_array_equal(mine, ref.astype(np.float32))
    assert exact_knn(np.repeat(z[:20], 2, axis=0), 5) == (None, None, None)  # ties: UMAP's own path
    idx, dist = exact_knn(z, 4)
    d = np.linalg.norm(z[:, None] - z[None], axis=2)
    np.testing.assert_array_equal(idx[:, 0], np.arange(len(z)))  # each point is its own nearest neighbour
    np.testing.assert_allclose(dist, np.sort(d, axis=1)[:, :4], rtol=1e-5, atol=1e-6)


def test_settings_dump_survives_a_json_round_trip() -> None:
    import json

    # the demo reuses its report only when audit.json's settings equal DEMO.dump(): a tuple must not break that
    assert json.loads(json.dumps(DEMO.dump())) == DEMO.dump()


def test_settings_choices_are_the_libraries_own() -> None:
    from analysis.faithfulness import BASELINES
    from analysis.settings import CAM_VARIANTS, FAITH_BASELINES
    from ex2l_xai.cam_variants import VARIANTS

    # settings.py imports nothing heavy, so it spells the choices out: they must stay the libraries' own
    assert set(CAM_VARIANTS) == set(VARIANTS) and FAITH_BASELINES == BASELINES
