"""Hostile and broken FCS input: every outcome is a result or an FcsError with one line."""
import re

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cytometry.analysis import AnalysisOptions, analyze_file
from cytometry.loading.fcs import FcsError, FcsSample, read_fcs
from cytometry.simulation.simulate import simulate_tube, write_tube


@pytest.fixture(scope="module")
def small_fcs(tmp_path_factory):
    tube = simulate_tube("tbnk", seed=4, blood_volume_ul=0.1)
    return write_tube(tube, tmp_path_factory.mktemp("fuzz") / "small.fcs").read_bytes()


def outcome(path):
    """read_fcs either returns a sample or raises FcsError with a one-line message naming the file."""
    try:
        sample = read_fcs(path)
    except FcsError as exc:
        assert "\n" not in str(exc) and str(path) in str(exc)
        return "error"
    assert isinstance(sample, FcsSample) and np.isfinite(sample.events).all()
    return "ok"


def _header_text_end(data):
    return int(data[18:26].strip())


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_bytes_never_escape_as_other_exceptions(small_fcs, tmp_path, data):
    raw = bytearray(small_fcs)
    text_end = _header_text_end(raw)
    kind = data.draw(st.sampled_from(["flip_header_text", "truncate", "keyword", "data_length"]))
    if kind == "flip_header_text":
        for _ in range(data.draw(st.integers(1, 8))):
            position = data.draw(st.integers(0, text_end))
            raw[position] = data.draw(st.integers(0, 255))
    elif kind == "truncate":
        raw = raw[:data.draw(st.integers(0, len(raw) - 1))]
    elif kind == "keyword":
        keyword = data.draw(st.sampled_from(["$PAR", "$TOT", "$DATATYPE", "$BYTEORD", "$P1B", "$P4R", "$BEGINDATA",
                                             "$ENDDATA", "$SPILLOVER"]))
        value = data.draw(st.one_of(st.integers(-10, 10 ** 13).map(str), st.sampled_from(["I", "F", "D", "A", "",
                                                                                         "4,3,2,1", "1,2"]),
                                    st.text(alphabet="0123456789,.-xX ", max_size=12)))
        text = raw[:text_end + 1].decode("latin-1")
        pattern = re.escape(keyword) + r"/([^/]*)/"
        text = re.sub(pattern, lambda m: f"{keyword}/{value}/", text, count=1)
        raw = bytearray(text.encode("latin-1")) + raw[text_end + 1:]
    else:
        extra = data.draw(st.integers(-400, 400))
        raw = raw[:len(raw) + extra] if extra < 0 else raw + bytes(extra)
    path = tmp_path / "fuzzed.fcs"
    path.write_bytes(bytes(raw))
    outcome(path)


def minimal_fcs(keywords, data=b""):
    """An FCS 3.1 file from TEXT keywords and raw DATA bytes, offsets filled in."""
    def build(begin):
        fields = dict(keywords, BEGINDATA=str(begin), ENDDATA=str(begin + max(len(data), 1) - 1))
        return "/" + "/".join(f"${k}/{v}" for k, v in fields.items()) + "/"
    begin = 58
    for _ in range(3):  # the offsets' own digits change the TEXT length
        text = build(begin).encode("latin-1")
        begin = 58 + len(text)
    header = b"FCS3.1    " + b"".join(str(v).rjust(8).encode() for v in
                                      (58, 58 + len(text) - 1, begin, begin + max(len(data), 1) - 1, 0, 0))
    return header + text + data


BASE = {"BYTEORD": "1,2,3,4", "DATATYPE": "F", "MODE": "L", "NEXTDATA": "0", "P1B": "32", "P1N": "FSC-A",
        "P1R": "262144", "P2B": "32", "P2N": "SSC-A", "P2R": "262144"}


def test_absurd_event_count_refused_before_reading(tmp_path):
    path = tmp_path / "huge.fcs"
    path.write_bytes(minimal_fcs(dict(BASE, PAR="2", TOT="1000000000000"), np.zeros(8, "<f4").tobytes()))
    with pytest.raises(FcsError, match="more than the limit"):
        read_fcs(path)
    with pytest.raises(FcsError, match="truncated or inconsistent"):
        read_fcs(path, max_events=10 ** 13)  # within a raised limit, the DATA still does not fit


def test_event_limit_is_configurable(small_fcs, tmp_path):
    path = tmp_path / "small.fcs"
    path.write_bytes(small_fcs)
    assert read_fcs(path).n_events > 10
    with pytest.raises(FcsError, match="limit of 10"):
        read_fcs(path, max_events=10)


def test_minimal_valid_file_reads(tmp_path):
    path = tmp_path / "tiny.fcs"
    path.write_bytes(minimal_fcs(dict(BASE, PAR="2", TOT="3"), np.arange(6, dtype="<f4").tobytes()))
    sample = read_fcs(path)
    assert sample.n_events == 3 and sample.pnn == ["FSC-A", "SSC-A"]


def test_nan_events_dropped_with_a_flag_or_refused(tmp_path):
    tube = simulate_tube("tbnk", seed=6, blood_volume_ul=1.0)
    few = tube.events.copy()
    few[:5, 4] = np.nan
    tube.events = few
    path = write_tube(tube, tmp_path / "few_nan.fcs")
    result = analyze_file(path, options=AnalysisOptions(beads_per_test=50000, sample_volume_ul=50))
    assert result["status"] == "ok"
    assert any("5 events with NaN" in f for f in result["qc_flags"])
    many = simulate_tube("tbnk", seed=6, blood_volume_ul=1.0)
    many.events[::10, 3] = np.inf
    bad = write_tube(many, tmp_path / "many_inf.fcs")
    with pytest.raises(FcsError, match="NaN or infinite"):
        read_fcs(bad)


def test_fuzz_finding_unicode_digit_offset(tmp_path):
    """Found by benchmarks/fuzz_campaign.py: a $BEGINDATA of '¹518' ("digit" to str.isdigit, not to int)."""
    path = tmp_path / "superscript.fcs"
    keywords = dict(BASE, PAR="2", TOT="3")
    data = minimal_fcs(keywords, np.arange(6, dtype="<f4").tobytes()).decode("latin-1")
    data = data.replace("$BEGINDATA/", "$BEGINDATA/\u00b9", 1)
    path.write_bytes(data.encode("latin-1"))
    outcome(path)


def test_keywords_and_ids_never_become_paths(tmp_path):
    """A crafted $FIL or subject ID cannot choose where outputs are written."""
    from cytometry.outputs.cli import main

    tube = simulate_tube("car", seed=9, blood_volume_ul=1.0)
    tube.metadata["$FIL"] = "../../escaped.fcs"
    tube.metadata["TUBE NAME"] = "../../../etc/x"
    fcs = write_tube(tube, tmp_path / "in" / "tube.fcs")
    manifest = tmp_path / "in" / "manifest.csv"
    manifest.write_text("file,subject_id,visit,study_day,tube,beads_per_test,sample_volume_ul\n"
                        "tube.fcs,../../evil,d7,7,CAR,50000,50\n")
    out = tmp_path / "out"
    assert main(["analyze", str(fcs), "--manifest", str(manifest), "--plots", str(out / "plots"),
                 "--gatingml", str(out / "gml"), "--out", str(out / "store"), "--workers", "1", "--json"]) == 0
    assert main(["persistence", "--store", str(out / "store"), "--plots", str(out / "kinetics"), "--json"]) == 0
    written = {p.relative_to(tmp_path).parts[0] for p in tmp_path.rglob("*") if p.is_file()}
    assert written <= {"in", "out"}
    assert not (tmp_path.parent / "escaped.fcs").exists() and not (tmp_path.parent / "evil.kinetics.png").exists()
    [kinetics] = list((out / "kinetics").iterdir())  # made file-safe: "../../evil" -> "_.._evil-<hash of the ID>"
    assert re.fullmatch(r"_\.\._evil-[0-9a-f]{10}\.kinetics\.png", kinetics.name)
    assert kinetics.parent == out / "kinetics"


@pytest.mark.parametrize("datatype,byteord,dtype,bits", [("F", "1,2,3,4", "<f4", 32), ("F", "4,3,2,1", ">f4", 32),
                                                         ("D", "1,2,3,4", "<f8", 64), ("D", "4,3,2,1", ">f8", 64),
                                                         ("I", "1,2,3,4", "<u2", 16), ("I", "4,3,2,1", ">u2", 16),
                                                         ("I", "1,2", "<u2", 16), ("I", "2,1", ">u2", 16)])
def test_datatypes_and_byte_orders(tmp_path, datatype, byteord, dtype, bits):
    values = np.array([[1, 2], [300, 4000], [65000, 7]], dtype=float)
    keywords = dict(BASE, PAR="2", TOT="3", DATATYPE=datatype, BYTEORD=byteord, P1B=str(bits), P2B=str(bits),
                    P1R="65536", P2R="65536")
    path = tmp_path / f"{datatype}{dtype}.fcs"
    path.write_bytes(minimal_fcs(keywords, values.astype(dtype).tobytes()))
    sample = read_fcs(path)
    np.testing.assert_allclose(sample.events, values)
    assert sample.datatype == datatype


@pytest.mark.parametrize("byteord", ["8,7,6,5,4,3,2,1", "3,4,1,2", "big"])
def test_unsupported_byte_order_is_refused_not_guessed(tmp_path, byteord):
    keywords = dict(BASE, PAR="2", TOT="3", DATATYPE="D", BYTEORD=byteord, P1B="64", P2B="64")
    path = tmp_path / "order.fcs"
    path.write_bytes(minimal_fcs(keywords, np.ones(6, ">f8").tobytes()))
    with pytest.raises(FcsError, match="unsupported \\$BYTEORD"):
        read_fcs(path)
