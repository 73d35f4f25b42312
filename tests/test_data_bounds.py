"""File lists, webdataset brace patterns and tar members are read within bounds: a file list over
SSL_KIT_MAX_LIST_BYTES, a line over SSL_KIT_MAX_LIST_LINE_BYTES (a 100 MB field), a NUL byte or non-UTF-8 bytes are
a DataError naming the file and the line; a pattern of 10^8 shards is refused (naming it and SSL_KIT_MAX_SHARDS)
before any path is made. The memory claims are checked in child processes under an address-space cap of their
current use + 64 MiB, which the unbounded readers these replace would break."""
from __future__ import annotations

import gzip
import io
import json
import os
import subprocess
import sys
import tarfile
import textwrap

import pytest
from braceexpand import braceexpand

from ssl_kit.cli import main as cli_main
from ssl_kit.data.sources import apply_labels_csv, brace_count, build_index, expand_pattern
from ssl_kit.errors import DataError

HUGE_FIELD = 100 << 20  # bytes in one field of the hostile file list: more than the child's whole headroom


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SSL_KIT_CACHE", str(tmp_path / "cache"))


def listing(tmp_path, data: bytes, name: str = "list.csv"):
    (tmp_path / "a.png").write_bytes(b"not read while indexing")
    path = tmp_path / name
    path.write_bytes(data)
    return path


# --------------------------------------------------------------------------------------------- file lists
HOSTILE_LISTS = [  # (id, bytes, message part)
    ("NUL-byte", b"a.png,0\na\0.png,1\n", "list.csv:2: a NUL byte at column 2"),
    ("huge-field", b"a.png,0\n" + b"x" * (1 << 20) + b",1\n", "list.csv:2: a line longer than 65,536 bytes"),
    ("huge-label", b"a.png," + b"7" * 70_000 + b"\n", "list.csv:1: a line longer than 65,536 bytes"),
    ("not-UTF-8", b"a.png,0\n\xff\xfe.png,1\n", "list.csv:2: not UTF-8 text"),
    ("carriage-return-in-field", b"a.png,0\nb\r.png,1\n", "list.csv:2: not a CSV row"),
    ("quoted-field-never-closed", b'a.png,0\n"b.png,1\n' + b"c,2\n" * 40_000, "list.csv:"),
]


@pytest.mark.parametrize("data,part", [h[1:] for h in HOSTILE_LISTS], ids=[h[0] for h in HOSTILE_LISTS])
def test_hostile_file_list_lines_are_refused_naming_the_file_and_line(tmp_path, data, part):
    path = listing(tmp_path, data)
    with pytest.raises(DataError) as caught:
        build_index("filelist", str(path), use_cache=False)
    assert part in str(caught.value) and len(str(caught.value)) < 1000


def test_a_file_list_over_the_size_cap_is_refused_before_reading(tmp_path, monkeypatch, capsys):
    path = listing(tmp_path, b"a.png,0\n" * 100)
    monkeypatch.setenv("SSL_KIT_MAX_LIST_BYTES", "500")
    with pytest.raises(DataError, match=r"file list '.*list.csv' is 800 bytes; the limit is 500 \(raise it with "
                                        r"the environment variable SSL_KIT_MAX_LIST_BYTES\)"):
        build_index("filelist", str(path), use_cache=False)
    assert cli_main(["data", f"filelist:{path}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"ssl-kit: error: file list {str(path)!r} is 800 bytes") and "SSL_KIT_MAX_LIST_BYTES" in err
    monkeypatch.setenv("SSL_KIT_MAX_LIST_BYTES", "800")
    assert len(build_index("filelist", str(path), use_cache=False)) == 100


def test_the_cli_names_the_line_and_the_knob(tmp_path, capsys):
    path = listing(tmp_path, b"a.png,0\n" + b"y" * 70_000 + b"\n")
    assert cli_main(["data", f"filelist:{path}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"ssl-kit: error: {path}:2: a line longer than 65,536 bytes") and \
        "SSL_KIT_MAX_LIST_LINE_BYTES" in err


def test_a_labels_csv_goes_through_the_same_bounded_reader(tmp_path):
    good = listing(tmp_path, b"a.png\n")
    index = build_index("filelist", str(good), use_cache=False)
    (tmp_path / "empty.csv").write_bytes(b"path,label\n\n")
    with pytest.raises(DataError, match=r"data.labels '.*empty.csv' names no images"):  # was an IndexError
        apply_labels_csv(index, str(tmp_path / "empty.csv"))
    for name in ("labels.fifo", "labels.csv"):
        if name.endswith(".fifo"):
            os.mkfifo(tmp_path / name)  # no writer: a plain open() would block forever
        else:
            (tmp_path / name).write_bytes(b"a.png,cat\x00\n")
        with pytest.raises(DataError, match="not a regular file" if name.endswith(".fifo") else
                           r"labels.csv:1: a NUL byte at column 10"):
            apply_labels_csv(index, str(tmp_path / name))


def test_ordinary_lists_still_read_the_same(tmp_path):
    path = listing(tmp_path, b"\xef\xbb\xbfpath,label\r\na.png,cat\r\n\r\n./a.png,cat\r\n")  # BOM, CRLF, blank line
    index = build_index("filelist", str(path), use_cache=False)
    assert len(index) == 2 and index.classes == ["cat"]
    quoted = listing(tmp_path, b'"a.png","dog"\n', "quoted.csv")
    assert build_index("filelist", str(quoted), use_cache=False).classes == ["dog"]


# ------------------------------------------------------------------------------------------ brace patterns
def test_a_pattern_of_10_to_the_8_shards_is_refused_before_expansion(tmp_path):
    with pytest.raises(DataError, match=r"webdataset pattern '.*s-\{00000000..99999999\}.tar' expands to more "
                                        r"than 1,000,000 shard paths; the limit is 1,000,000 \(raise it with the "
                                        r"environment variable SSL_KIT_MAX_SHARDS\)"):
        build_index("webdataset", str(tmp_path / "s-{00000000..99999999}.tar"), use_cache=False)
    with pytest.raises(DataError, match="expands to more than 1,000,000"):
        expand_pattern("{0..999}{0..999}{0..1}")  # a product of small ranges counts too


def test_unbalanced_globbed_and_knob_limited_patterns(tmp_path, monkeypatch):
    with pytest.raises(DataError, match=r"webdataset pattern 's-\{0..3.tar' has unbalanced braces"):
        expand_pattern("s-{0..3.tar")
    with pytest.raises(DataError, match="nests braces more than 16 deep"):
        expand_pattern("{" * 100_000 + "a,b" + "}" * 100_000)  # refused in one pass (the parsers would recurse)
    assert expand_pattern("{" * 16 + "a,b" + "}" * 16) == ["{" * 15 + "a" + "}" * 15, "{" * 15 + "b" + "}" * 15]
    for number in range(3):
        (tmp_path / f"g-{number}.tar").write_bytes(b"")
    monkeypatch.setenv("SSL_KIT_MAX_SHARDS", "2")
    with pytest.raises(DataError, match=r"matches more than 2 shard paths; the limit is 2"):
        expand_pattern(str(tmp_path / "g-*.tar"))
    with pytest.raises(DataError, match=r"expands to more than 2 shard paths"):
        expand_pattern(str(tmp_path / "g-{0..2}.tar"))
    assert expand_pattern(str(tmp_path / "g-{0..1}.tar")) == [str(tmp_path / f"g-{n}.tar") for n in range(2)]


@pytest.mark.parametrize("pattern", ["a{0..3}b", "{a,b}{1..10..3}", "x{a..e}", "{A..z..5}", "}{", "}{{a,b}",
                                     "{a,{b,c}}d", "{}", "{,}", "{a}", "{a\\,b,c}", "{10..1..4}", "{-3..2}",
                                     "{007..010}", "{Z..a}", "{a,b{1..0}}", "{a..a}", "{0..0..0}"])
def test_the_count_is_what_braceexpand_makes(pattern):
    assert brace_count(pattern, 10**9) == len(list(braceexpand(pattern)))


# ------------------------------------------------------------------------- memory caps in a child process
CHILD = textwrap.dedent("""
    import json, pathlib, resource, sys
    from ssl_kit.bundle import extract_bundle
    from ssl_kit.data.sources import build_index, expand_pattern
    from ssl_kit.errors import SslKitError

    def vm_size():
        with open("/proc/self/status") as status:
            return int(next(l for l in status if l.startswith("VmSize:")).split()[1]) * 1024

    READERS = {"filelist": lambda arg: build_index("filelist", arg, use_cache=False),
               "webdataset": lambda arg: build_index("webdataset", arg, workers=1, use_cache=False),
               "pattern": expand_pattern,
               "bundle": lambda arg: extract_bundle(arg, pathlib.Path(arg + ".out"))}
    headroom = int(sys.argv[2])
    for name, scenario, arg in json.loads(sys.argv[1]):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        resource.setrlimit(resource.RLIMIT_AS, (vm_size() + headroom, resource.RLIM_INFINITY))
        try:
            READERS[scenario](arg)
            outcome = "accepted"
        except SslKitError as exc:
            outcome = str(exc)
        except MemoryError:
            outcome = "MemoryError"
        finally:
            resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
        print(json.dumps([name, grown, outcome]), flush=True)
""")
HEADROOM = 64 << 20


def claiming_tar(members: list[tuple[str, int]], data: bytes = b"x" * 1024) -> bytes:
    """A tar whose members' headers claim `size` bytes each while only `data` follows each header."""
    out = io.BytesIO()
    for name, size in members:
        info = tarfile.TarInfo(name)
        info.size = size
        out.write(info.tobuf(format=tarfile.GNU_FORMAT) + data)
    return out.getvalue()


def hostile_inputs(folder) -> list[tuple[str, str, str]]:
    """(name, reader, path or pattern) of each hostile input, written under `folder`."""
    with open(folder / "list.csv", "wb") as handle:
        handle.write(b"a.png,0\n" + b"x" * HUGE_FIELD + b",1\n")
    (folder / "cls.tar").write_bytes(claiming_tar([("k0.cls", 6 << 30)]))
    (folder / "img.tar").write_bytes(claiming_tar([("k0.jpg", 6 << 30)]))
    (folder / "bundle.tar.gz").write_bytes(gzip.compress(claiming_tar([("run/config.yaml", 9 << 30)])))
    return [("field", "filelist", str(folder / "list.csv")),
            ("pattern", "pattern", str(folder / "s-{00000000..99999999}.tar")),
            ("cls", "webdataset", str(folder / "cls.tar")), ("img", "webdataset", str(folder / "img.tar")),
            ("bundle", "bundle", str(folder / "bundle.tar.gz"))]


@pytest.fixture(scope="module")
def capped(tmp_path_factory) -> dict:
    """Every hostile input read in one child process (one import of ssl_kit), each under RLIMIT_AS = the child's
    mapping + HEADROOM -> {name: (peak RSS growth in bytes, the error message)}."""
    folder = tmp_path_factory.mktemp("capped")
    env = {**os.environ, "SSL_KIT_CACHE": str(folder / "cache"), "MALLOC_ARENA_MAX": "1"}
    done = subprocess.run([sys.executable, "-c", CHILD, json.dumps(hostile_inputs(folder)), str(HEADROOM)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    results = [json.loads(line) for line in done.stdout.splitlines()]
    return {name: (grown, outcome) for name, grown, outcome in results} | {"folder": folder}


def test_a_file_list_with_a_100_MB_field_stays_within_the_cap(capped):
    grown, message = capped["field"]
    assert message.startswith(f"{capped['folder'] / 'list.csv'}:2: a line longer than 65,536 bytes")
    assert "SSL_KIT_MAX_LIST_LINE_BYTES" in message and grown < HEADROOM


def test_a_pattern_of_10_to_the_8_shards_stays_within_the_cap(capped):
    grown, message = capped["pattern"]
    assert "expands to more than 1,000,000 shard paths" in message and "SSL_KIT_MAX_SHARDS" in message
    assert grown < HEADROOM


def test_tar_members_claiming_gigabytes_stay_within_the_cap(capped):
    grown, message = capped["cls"]
    assert "member 'k0.cls' is 6,442,450,944 bytes; a .cls member holds one class number" in message
    assert grown < HEADROOM
    grown, message = capped["img"]  # skipped unread (past the shard's end); the next header is missing
    assert "img.tar' cannot be read: unexpected end of data" in message and grown < HEADROOM
    grown, message = capped["bundle"]
    assert "member 'run/config.yaml' holds 9,663,676,416 bytes; the limit is 8,589,934,592" in message
    assert grown < HEADROOM and not (capped["folder"] / "bundle.tar.gz.out").exists()
