"""URL state: every preset round-trips through query params; tampered values fall back with a notice, never raise."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from attnviz.formats import urlstate
from attnviz.formats.urlstate import Rule
from attnviz.pagemodels import playground as pg


@dataclass(frozen=True)
class Inner:
    flag: bool = False
    lens: tuple[int, ...] = ()


@dataclass(frozen=True)
class Toy:
    n: int = 3
    x: float = 0.5
    mode: str = "a"
    inner: Inner = field(default_factory=Inner)

    def validate(self):
        if self.mode == "b" and self.n > 5:
            raise ValueError(f"mode b needs n <= 5, got {self.n}")


RULES = {"n": Rule(0, 10), "x": Rule(0.0, 1.0), "mode": Rule(choices=("a", "b")), "lens": Rule(0, 100)}


def test_encode_only_changed_fields_and_decode_back():
    toy = Toy(n=4, inner=Inner(flag=True, lens=(3, 2)))
    params = urlstate.encode(toy, prefix="t_")
    assert params == {"t_n": "4", "t_flag": "1", "t_lens": "3,2"}
    decoded = urlstate.decode(params, Toy(), prefix="t_", rules=RULES)
    assert decoded.config == toy and decoded.clean and decoded.read == ("flag", "lens", "n")


def test_floats_round_trip_exactly():
    for x in (0.1, 1 / 3, 5e-324, 0.30000000000000004):
        toy = Toy(x=x)
        assert urlstate.decode(urlstate.encode(toy), Toy()).config.x == x


def test_unknown_and_foreign_keys_are_ignored_silently():
    decoded = urlstate.decode({"t_zzz": "1", "other_n": "9", "n": "9"}, Toy(), prefix="t_", rules=RULES)
    assert decoded.config == Toy() and decoded.clean


@pytest.mark.parametrize(
    "key, value, fragment",
    [
        ("t_n", "11", "above the maximum 10"),
        ("t_n", "-1", "below the minimum 0"),
        ("t_n", "3.5", "not a whole number"),
        ("t_x", "nan", "not a finite number"),
        ("t_x", "inf", "not a finite number"),
        ("t_x", "1e400", "not a finite number"),
        ("t_mode", "<script>", "not one of ['a', 'b']"),
        ("t_flag", "maybe", "not true/false"),
        ("t_lens", "1,x", "not a list of whole numbers"),
        ("t_lens", "1,200", "above the maximum 100"),
        ("t_n", "9" * 300, "too long"),
    ],
)
def test_bad_values_fall_back_to_the_default_with_a_notice(key, value, fragment):
    decoded = urlstate.decode(
        {key: value, "t_n" if key != "t_n" else "t_x": "1" if key != "t_n" else "0.25"}, Toy(), prefix="t_", rules=RULES
    )
    assert len(decoded.notices) == 1 and fragment in decoded.notices[0] and key in decoded.notices[0]
    name = key[2:]
    assert urlstate.flatten(decoded.config)[name] == urlstate.flatten(Toy())[name]  # the default, not the URL's


def test_an_invalid_combination_falls_back_to_all_defaults():
    decoded = urlstate.decode({"t_mode": "b", "t_n": "7"}, Toy(), prefix="t_", rules=RULES)
    assert decoded.config == Toy()
    assert "do not work together" in decoded.notices[0] and "n <= 5" in decoded.notices[0]


def test_repeated_key_last_wins():
    assert urlstate.decode({"n": ["1", "2"]}, Toy(), rules=RULES).config.n == 2


@pytest.mark.parametrize("name", list(pg.PRESETS))
def test_every_playground_preset_round_trips(name):
    config = pg.PRESETS[name]
    params = pg.to_url(config)
    assert all(k.startswith("pg_") and isinstance(v, str) for k, v in params.items())
    decoded = pg.from_url(params)
    assert decoded.clean, decoded.notices
    assert decoded.config == config


def test_playground_default_preset_has_an_empty_url():
    assert pg.to_url(pg.PRESETS[pg.DEFAULT_PRESET]) == {}


def test_playground_tampered_url_reports_and_keeps_the_rest():
    decoded = pg.from_url({"pg_t": "999", "pg_seed": "42", "pg_source": "../../etc/passwd", "pg_evil": "1"})
    assert decoded.config.seed == 42 and decoded.config.t == pg.PRESETS[pg.DEFAULT_PRESET].t
    assert len(decoded.notices) == 2
    assert any("pg_t: 999 is above the maximum 128" in n for n in decoded.notices)


def test_playground_incompatible_heads_fall_back_to_defaults():
    decoded = pg.from_url({"pg_num_heads": "6", "pg_num_kv_heads": "4"})
    assert decoded.config == pg.PRESETS[pg.DEFAULT_PRESET]
    assert "num_heads (6) must be divisible by num_kv_heads (4)" in decoded.notices[-1]


def test_playground_self_attention_follows_t():
    assert pg.from_url({"pg_t": "5"}).config.s == 5


@settings(max_examples=60, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(
            [
                "pg_t",
                "pg_num_heads",
                "pg_dropout",
                "pg_causal",
                "pg_valid_lens",
                "pg_training",
                "pg_seed",
                "pg_x",
                "pg_weight_scale",
            ]
        ),
        st.text(max_size=30),
    )
)
def test_playground_from_url_never_raises(params):
    decoded = pg.from_url(params)
    decoded.config.validate()  # whatever came in, what comes out is runnable


@settings(max_examples=40, deadline=None)
@given(
    t=st.integers(1, 16),
    heads=st.sampled_from([1, 2, 4]),
    seed=st.integers(0, 2**31 - 1),
    dropout=st.floats(0.0, 0.9),
    causal=st.sampled_from(pg.CAUSAL_CHOICES),
    lens=st.lists(st.integers(0, 16)),
)
def test_playground_random_configs_round_trip(t, heads, seed, dropout, causal, lens):
    base = pg.PRESETS[pg.DEFAULT_PRESET]
    config = replace(
        base,
        t=t,
        s=t,
        num_heads=heads,
        num_kv_heads=0,
        seed=seed,
        dropout=dropout,
        masks=replace(base.masks, causal=causal, valid_lens=tuple(lens[:2]) if len(lens) >= 2 else ()),
    )
    assert pg.from_url(pg.to_url(config)).config == config
