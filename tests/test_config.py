"""config.py is the one declaration of every option: the CLI's flags, defaults and help come
from the fields, validate() gives API users the CLI's errors, the shared groups are one
declaration, and a manifest's record round-trips."""

from __future__ import annotations

from dataclasses import fields

import pytest
import typer

from lite_influence.cli import app
from lite_influence.config import (AuditConfig, BuildConfig, Columns, ModelOptions, QueryConfig, TrainConfig,
                                   flag_of, truthy)
from lite_influence.errors import UserError

COMMANDS = {"build": BuildConfig, "query": QueryConfig, "audit": AuditConfig, "train": TrainConfig}


def command_params(name: str) -> dict:
    command = typer.main.get_command(app).commands[name]
    return {p.name: p for p in command.params if p.param_type_name == "option"}


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_field_is_a_flag_with_its_default_help_and_short(name):
    params = command_params(name)
    for f in fields(COMMANDS[name]):
        param = params[f.name]
        assert flag_of(f) in param.opts
        assert param.default == f.default and param.help == f.metadata["help"]
        if f.metadata.get("short"):
            assert f.metadata["short"] in param.opts


def test_flag_names_kept_from_before():
    assert {"--agg"} == set(command_params("audit")["aggs"].opts)
    assert {"--k", "-k"} == set(command_params("query")["k"].opts)
    assert {"--text-col"} == set(command_params("build")["text_col"].opts)


def test_shared_groups_are_declared_once():
    columns = {f.name for f in fields(Columns)}
    for cls in (BuildConfig, AuditConfig, TrainConfig):
        assert columns <= {f.name for f in fields(cls)} and issubclass(cls, Columns)
    assert issubclass(BuildConfig, ModelOptions) and issubclass(TrainConfig, ModelOptions)
    shared = {f.name: f.metadata for f in fields(Columns)}
    for cls in (BuildConfig, AuditConfig, TrainConfig):
        assert {f.name: f.metadata for f in fields(cls) if f.name in shared} == shared


@pytest.mark.parametrize("config, words", [
    (BuildConfig(projection="svd"), "unknown projection 'svd'"),
    (BuildConfig(metric="l2"), "unknown metric 'l2'"),
    (BuildConfig(proj_dim=0), "--proj-dim must be at least 1, got 0"),
    (BuildConfig(exact_max=-1), "--exact-max must be 0 or more"),
    (BuildConfig(limit=0), "--limit must be at least 1"),
    (QueryConfig(agg="median"), "unknown aggregation 'median'"),
    (QueryConfig(k=0), "-k must be at least 1"),
    (AuditConfig(levels="ten"), "--levels must be percentages like"),
    (AuditConfig(levels="0,20"), "in (0, 100]"),
    (AuditConfig(aggs="rank,best"), "unknown aggregation 'best'"),
    (AuditConfig(vote_p=1.5), "--vote-p must be in (0, 1]"),
])
def test_validate_raises_the_cli_error(config, words):
    with pytest.raises(UserError) as error:
        config.validate()
    assert words in str(error.value)


def test_valid_configs_validate_and_levels_parse():
    defaults = BuildConfig().validate()  # each projection's own size, resolved and recorded
    assert (defaults.projection, defaults.proj_dim, defaults.proj_dim_in, defaults.energy) == ("mixed", 4, 32, 0.8)
    assert (BuildConfig(projection="pca").validate().proj_dim, BuildConfig(projection="pca").validate().proj_dim_in) == (8, None)
    assert BuildConfig(proj_dim=16).validate().proj_dim_in is None  # a given size is square
    assert BuildConfig(proj_dim_in=32).validate().proj_dim == 4
    assert AuditConfig(levels="10,12.5").validate().level_fractions == (0.1, 0.125)
    assert AuditConfig(aggs=" vote , rank").agg_list == ["vote", "rank"]


def test_manifest_record_round_trips_and_ignores_unknown_keys():
    config = BuildConfig(proj_dim=5, text_col="review", task="causal-lm")
    assert BuildConfig.from_dict({**config.to_dict(), "from_a_newer_version": 1}) == config


@pytest.mark.parametrize("value, expected", [("1", True), (" TRUE ", True), ("yes", True), ("t", True),
                                             (1, True), ("0", False), ("", False), (None, False), ("no", False)])
def test_truthy(value, expected):
    assert truthy(value) is expected
