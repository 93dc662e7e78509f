"""The one parameter table: every config field a parameter, every derived view in step with it."""
import dataclasses
from pathlib import Path

from nblib.setup import config, parameters, params
from nblib.training import contract

DOCS = Path(__file__).resolve().parent.parent / "docs" / "parameters.md"


def test_every_field_of_the_configuration_is_one_parameter_with_its_help_and_rule():
    fields = {(section, f.name) for section, cls in (("", config.RunConfig), *config.SECTIONS.items())
              for f in dataclasses.fields(cls) if f.name not in (*config.SECTIONS, "started_at", "given")}
    assert {(p.section, p.field) for p in parameters.TABLE} == fields
    assert len(parameters.NAMES) == len(set(parameters.NAMES)) == 64
    for p in parameters.TABLE:
        assert p.help and p.resume in (config.IDENTITY, config.BOUND, config.APPLIED, config.FREE), p.name
        assert (p.default is None) == bool(p.presets) or p.name in ("output_dir", "stride"), p.name


def test_each_preset_gives_every_parameter_left_at_none_a_value():
    for preset, values in parameters.PRESET_VALUES.items():
        left_at_none = {p.name for p in parameters.TABLE if p.default is None and p.presets}
        assert set(values) == left_at_none, preset


def test_the_boundary_and_the_contract_read_the_same_table():
    assert params.PARAMETERS == parameters.NAMES and contract.RULES is parameters.RULES
    assert params.parameter_type("learning_rate") == float | None and params.DEFAULTS["max_bad_steps"] == 10


def test_docs_parameters_md_is_generated_from_the_table():
    assert DOCS.read_text() == parameters.markdown(), "run: python -m nblib.setup.parameters > docs/parameters.md"
