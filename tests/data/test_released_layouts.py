"""The report's sources as released (tests/data/released.py), through the shipped data_mix files."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import compose_config
from tests.data import released
from xgen.config import ConfigError
from xgen.data import build_pipeline
from xgen.data.addresses import LIST_SEP
from xgen.data.prepare import prepare_mix
from xgen.data.store import ShardStore
from xgen.tokenizer import Tokenizer

TOK = Tokenizer.xgen()
SEQ = 64


def configure(data_dir, mix, *overrides):
    return compose_config(
        f"data_mix={mix}", f"data_dir={data_dir}", "prepare.workers=0", f"stage.seq_len={SEQ}",
        f"stage.batch_tokens={SEQ * 40}", *overrides,
    )  # fmt: skip


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """RedPajama (text and GitHub), StarCoderData and The Stack under raw/, as released."""
    root = tmp_path_factory.mktemp("released")
    released.redpajama(root / "raw" / "natural_language")
    released.redpajama_github(root / "raw" / "code")
    released.starcoderdata(root / "raw" / "starcoder")
    released.the_stack(root / "raw" / "the_stack")
    for mix in ("stage2_starcoder", "stage2_the_stack"):
        cfg = configure(root, mix)
        prepare_mix(cfg.data_mix, TOK, cfg.prepare)
    return root


def owners(pipe) -> dict[bytes, str]:
    """Each window's bytes -> the part it comes from (every window of every part)."""
    table = {}
    for name, part in zip(pipe.names, pipe.parts):
        table.update({part[i]["tokens"].tobytes(): name for i in range(len(part))})
    return table


def drawn_parts(pipe, steps: int) -> list[str]:
    table = owners(pipe)
    out = []
    for step in range(steps):
        batch = pipe.dataset[step]
        for row in np.concatenate([batch["inputs"], batch["targets"][:, -1:]], axis=1):
            out.append(table[row.tobytes()])
    return out


def test_redpajama_metadata_is_read_from_folders_and_nested_meta(data_dir):
    nl = ShardStore(data_dir / "prepared" / "natural_language", TOK)
    assert set(nl.meta["source"]) == set(released.NL_SUBSETS)  # path:0, common_crawl/<date>/... included
    code = ShardStore(data_dir / "prepared" / "code", TOK)
    languages = set(code.meta["language"])
    assert languages == {"Python", f"Python{LIST_SEP}Shell"}  # meta.language[].name, a list
    assert set(code.meta["license"]) == {"mit", "apache-2.0", "bsd-3-clause"}
    assert all(r.startswith("octo/repo-") for r in code.meta["repository"])


def test_stage2_starcoder_on_starcoderdata_is_half_code_with_the_manifests_language_shares(data_dir):
    cfg = configure(data_dir, "stage2_starcoder")
    pipe = build_pipeline(cfg.data_mix, cfg.stage, TOK)
    seen = drawn_parts(pipe, 100)
    assert len(seen) == 4000
    star = [s for s in seen if s.startswith("starcoder/")]
    assert len(star) / len(seen) == pytest.approx(0.5, abs=0.005)
    by_language = ShardStore(data_dir / "prepared" / "starcoder", TOK).tokens_by("language")
    assert set(by_language) == set(released.STARCODER_FILES)  # the folder names
    total = sum(by_language.values())
    for lang, tokens in by_language.items():
        assert star.count(f"starcoder/{lang}") / len(star) == pytest.approx(tokens / total, abs=0.005)
    assert {r["part"]: r["weight"] for r in pipe.report["parts"]}["natural_language"] == pytest.approx(0.47655, rel=0.01)


def test_the_stacks_license_lists_pass_when_any_license_is_permissive(data_dir):
    cfg = configure(data_dir, "stage2_the_stack")
    pipe = build_pipeline(cfg.data_mix, cfg.stage, TOK)
    store = ShardStore(data_dir / "prepared" / "the_stack", TOK)
    starcoder = [p for p, name in zip(pipe.parts, pipe.names) if name.startswith("starcoder/")]
    kept = set(np.concatenate([p.docs for p in starcoder]).tolist())
    for doc, value in enumerate(store.meta["license"]):
        licenses = [x.lower() for x in value.split(LIST_SEP) if x]
        assert (doc in kept) == any(x in released.PERMISSIVE for x in licenses), licenses
    assert {n.split("/")[1] for n in pipe.names if n.startswith("starcoder/")} == {"Python", "Go"}
    rows = [r for r in pipe.report["parts"] if r["source"] == "starcoder"]
    assert all(r["dropped"]["license"] > 0 for r in rows)  # gpl-only and empty lists, counted
    assert sum(r["weight"] for r in rows) == pytest.approx(0.5, rel=0.01)


def test_a_license_filter_over_files_without_licenses_is_one_line_naming_the_fix(data_dir):
    cfg = configure(data_dir, "stage2_starcoder", "data_mix.sources.starcoder.licenses=[mit]", "+data_mix.sources.starcoder.raw.meta.license=license")
    cfg.data_mix.sources["starcoder"].path = str(data_dir / "prepared" / "starcoder_with_license_field")
    prepare_mix(cfg.data_mix, TOK, cfg.prepare)
    with pytest.raises(ConfigError, match=r"none of its \d+ documents carries a license .*set licenses: null") as e:
        build_pipeline(cfg.data_mix, cfg.stage, TOK)
    assert "\n" not in str(e.value)


def test_a_filter_that_empties_a_language_is_an_error_or_with_allow_empty_a_recorded_skip(data_dir):
    cfg = configure(data_dir, "stage2_the_stack", "++data_mix.sources.starcoder.where={language: [Python]}")
    with pytest.raises(ConfigError, match=r"part starcoder/Go has no documents .*where:language"):
        build_pipeline(cfg.data_mix, cfg.stage, TOK)
    cfg = configure(
        data_dir, "stage2_the_stack", "++data_mix.sources.starcoder.where={language: [Python]}",
        "++data_mix.sources.starcoder.allow_empty=true",
    )  # fmt: skip
    pipe = build_pipeline(cfg.data_mix, cfg.stage, TOK)
    rows = {r["part"]: r for r in pipe.report["parts"]}
    assert rows["starcoder/Go"]["weight"] == 0 and "skipped" in rows["starcoder/Go"]
    assert rows["starcoder/Go"]["configured_weight"] == 0  # shares are of the tokens the filters keep
    assert rows["starcoder/Python"]["configured_weight"] == pytest.approx(0.5, abs=1e-4)
    assert sum(r["weight"] for r in rows.values()) == pytest.approx(1.0, abs=1e-4)
    assert "starcoder/Go" not in pipe.names


def test_a_filter_that_keeps_nothing_names_the_source_filter_and_values(data_dir):
    cfg = configure(data_dir, "stage2_the_stack", "data_mix.sources.starcoder.licenses=[wtfpl]")
    with pytest.raises(ConfigError, match=r"sources.starcoder.licenses=\['wtfpl'\] keeps 0 of \d+ documents \(values: 'mit' x"):
        build_pipeline(cfg.data_mix, cfg.stage, TOK)


def test_a_source_whose_sampled_share_drifts_from_its_configured_share_is_refused(data_dir):
    cfg = configure(data_dir, "stage2_starcoder", "data_mix.weight_tolerance=0.0")
    cfg.data_mix.sources["code"].weight = 1e-4  # grain's integer proportions cannot draw 0.47655 exactly then
    with pytest.raises(ConfigError, match="sampled share .* differs from the configured"):
        build_pipeline(cfg.data_mix, cfg.stage, TOK)


def test_slimpajama_subsets_are_selected_and_weighted_from_one_prepared_copy(tmp_path):
    released.slimpajama(tmp_path / "raw" / "slimpajama")
    cfg = configure(tmp_path, "stage1_slimpajama", "stage=s4_code_8k", f"stage.seq_len={SEQ}", f"stage.batch_tokens={SEQ * 40}")
    totals = prepare_mix(cfg.data_mix, TOK, cfg.prepare)
    assert list(totals) == ["natural_language"]  # the shared path is prepared once
    pipe = build_pipeline(cfg.data_mix, cfg.stage, TOK)
    store = ShardStore(tmp_path / "prepared" / "slimpajama", TOK)
    nl, code = (pipe.parts[pipe.names.index(n)] for n in ("natural_language", "code"))
    assert set(store.meta["subset"][code.docs]) == {"RedPajamaGithub"}
    assert set(store.meta["subset"][nl.docs]) == set(released.SLIM_SETS) - {"RedPajamaGithub"}
    seen = drawn_parts(pipe, 50)
    assert seen.count("code") / len(seen) == pytest.approx(0.0469, abs=0.005)
