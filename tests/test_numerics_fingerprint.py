"""benchmarks/numerics_fingerprint.py: its digests are the exact bytes of the ops (stable within a machine, changed
by one flipped input bit), and --compare names each entry that differs and fails only on digests."""
import json

import torch

from benchmarks import numerics_fingerprint as fp


def test_digests_are_stable_and_see_one_bit(capsys, tmp_path):
    threads = ["--threads", str(torch.get_num_threads())]  # the gradients' bits depend on it
    first = fp.fingerprint()
    assert first == fp.fingerprint()
    assert len(first["digests"]) == 2 * len(fp.BATCH_SIZES) + 4
    x = torch.linspace(0, 1, 10)
    flipped = x.clone()
    flipped.view(torch.int32)[3] ^= 1  # the lowest mantissa bit of one element
    assert fp.digest(x) == fp.digest(x.clone()) != fp.digest(flipped)

    mine = tmp_path / "mine.json"
    mine.write_text(json.dumps(first))
    assert fp.main(["--compare", str(mine), *threads]) == 0
    assert capsys.readouterr().out.strip().endswith("identical")

    other = json.loads(mine.read_text())
    other["digests"]["strong_view"] = "0" * 16
    other["environment"]["cpu"] = "another CPU"
    (tmp_path / "other.json").write_text(json.dumps(other))
    assert fp.main(["--compare", str(tmp_path / "other.json"), *threads]) == 1
    out = capsys.readouterr().out
    assert f"digests/strong_view: {'0' * 16} -> {first['digests']['strong_view']}" in out
    assert "environment/cpu: another CPU ->" in out and "2 entries differ" in out

    del other["digests"]["strong_view"]
    other["digests"] = first["digests"]
    (tmp_path / "other.json").write_text(json.dumps(other))
    assert fp.main(["--compare", str(tmp_path / "other.json"), *threads]) == 0  # an environment difference alone passes
