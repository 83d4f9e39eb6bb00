"""Loading, spillover parsing, compensation (against flowkit) and logicle."""
import numpy as np
import pytest

from cytometry.loading.fcs import FcsError, parse_spillover, read_fcs
from cytometry.preprocess import compensate, logicle, read_compensation_csv


def test_compensation_equals_flowkit_on_real_file(real_fcs):
    import flowkit as fk

    sample = read_fcs(real_fcs)
    assert sample.spillover is not None and sample.spillover.source == "SPILL"
    reference = fk.Sample(str(real_fcs), subsample=0)
    reference.apply_compensation(reference.metadata["spill"])
    theirs = reference.get_events(source="comp")
    # The algorithm, on flowkit's own float64 raw events: flowkit's numbers.
    ours = compensate(reference.get_events(source="raw"), sample.pnn, sample.spillover)
    assert ours.dtype == np.float64
    np.testing.assert_allclose(ours, theirs, rtol=1e-9, atol=1e-6)
    # Compensation must have changed the fluorescence channels.
    assert not np.allclose(ours[:, 4], sample.events[:, 4])
    # The float32 path the CLI takes: within float32 rounding of the raw values and of the result.
    ours32 = compensate(sample.events, sample.pnn, sample.spillover)
    assert ours32.dtype == np.float32
    columns = [sample.pnn.index(d) for d in sample.spillover.detectors]
    raw = reference.get_events(source="raw")[:, columns]
    bound = np.finfo(np.float32).eps * (np.abs(raw) @ np.abs(np.linalg.inv(sample.spillover.matrix))
                                        + np.abs(theirs[:, columns]))
    assert np.all(np.abs(ours32[:, columns] - theirs[:, columns]) <= bound)


def test_compensation_inverts_known_spillover():
    rng = np.random.default_rng(0)
    signal = rng.uniform(0, 1000, size=(200, 3))
    spill = np.array([[1.0, 0.2, 0.05], [0.01, 1.0, 0.3], [0.0, 0.02, 1.0]])
    raw = np.column_stack([rng.uniform(size=200), signal @ spill])
    from cytometry.loading.fcs import Spillover

    out = compensate(raw, ["FSC-A", "A", "B", "C"], Spillover(["A", "B", "C"], spill, "test"))
    np.testing.assert_allclose(out[:, 1:], signal, rtol=1e-9, atol=1e-9)
    np.testing.assert_array_equal(out[:, 0], raw[:, 0])


def test_parse_spillover_forms():
    pnn = ["FSC-A", "SSC-A", "FL1-A", "FL2-A", "Time"]
    named = parse_spillover("2,FL2-A,FL1-A,1,0.1,0.2,1", pnn)
    assert named.detectors == ["FL2-A", "FL1-A"]
    unnamed = parse_spillover("2,1,0.1,0.2,1", pnn, source="$COMP")
    assert unnamed.detectors == ["FL1-A", "FL2-A"] and unnamed.source == "$COMP"
    with pytest.raises(ValueError, match="FL9-A"):
        parse_spillover("2,FL1-A,FL9-A,1,0,0,1", pnn)
    with pytest.raises(ValueError, match="fields"):
        parse_spillover("2,FL1-A,FL2-A,1,0,0", pnn)


def test_compensation_csv(tmp_path):
    path = tmp_path / "comp.csv"
    path.write_text(",FL1-A,FL2-A\nFL1-A,1,0.25\nFL2-A,0.01,1\n")
    spill = read_compensation_csv(path, ["FSC-A", "FL1-A", "FL2-A"])
    assert spill.matrix[0, 1] == 0.25 and spill.detectors == ["FL1-A", "FL2-A"]
    path.write_text("FL1-A,FL2-A\n1,x\n0,1\n")
    with pytest.raises(ValueError, match="not a number"):
        read_compensation_csv(path, ["FL1-A", "FL2-A"])


def test_logicle_matches_flowkit_transform():
    import flowkit as fk

    values = np.array([[-500.0], [-10.0], [0.0], [10.0], [1000.0], [50000.0], [262144.0]])
    ours = logicle(values, [0], top=262144)[:, 0]
    xform = fk.transforms.LogicleTransform(param_t=262144, param_w=0.5, param_m=4.5, param_a=0)
    theirs = xform.apply(values)[:, 0]
    np.testing.assert_allclose(ours, theirs, atol=1e-9)
    assert np.all(np.diff(ours) > 0)


@pytest.mark.parametrize("content,problem", [
    (b"", "empty"),
    (b"hello, this is a text file\n", "not an FCS file"),
    (b"FCS3.1    " + b"0" * 40, "truncated"),
    (b"FCS3.1    " + b"0" * 48, "HEADER places TEXT"),
])
def test_bad_files_give_one_line_error(tmp_path, content, problem):
    path = tmp_path / "bad.fcs"
    path.write_bytes(content)
    with pytest.raises(FcsError) as err:
        read_fcs(path)
    assert problem in str(err.value)
    assert str(path) in str(err.value)
    assert "\n" not in str(err.value)


def test_truncated_real_file(real_fcs, tmp_path):
    data = real_fcs.read_bytes()
    path = tmp_path / "truncated.fcs"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(FcsError) as err:
        read_fcs(path)
    assert "truncated.fcs" in str(err.value) and "\n" not in str(err.value)
