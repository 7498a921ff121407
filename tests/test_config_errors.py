"""Configuration errors, as an operator meets them.

Each bad config goes through `--check` and through a real run. Both must exit 2
before DPDK starts, print nothing on stdout, and say on stderr
`error: FILE:LINE: field `FIELD`: message`, with the line of the offending value.
"""

import os
import re

import pytest

from bitw_testlib import EXIT_CONFIG, EXIT_OK, REPO_ROOT, eal_args, run_binary, toml_value, write_key_file

BASE = """\
[eal]
args = {eal}

[dataplane]
workers = 1
burst = 32
default_action = "bypass"

[ports.inside]
device = "net_null0"
[ports.outside]
device = "net_null1"

[[policy]]
name = "web"
direction = "out"
src = "10.0.0.0/24"
dst = "any"
proto = "tcp"
sport = "any"
dport = "1000-2000"
action = "bypass"

[[policy]]
name = "hq"
direction = "in"
src = "2001:db8::/32"
proto = 17
dport = 53
action = "protect"
sa = "to-hq"

[[sa]]
name = "to-hq"
direction = "in"   # the SA
spi = "0x00001001"
mode = "tunnel"
tunnel_src = "2001:db8::1"
tunnel_dst = "2001:db8::2"
aead = "aes128gcm16"
key_file = "{key}"
"""

KEY20 = bytes(range(20))  # AES-128 key + salt


@pytest.fixture
def keys(tmp_path):
    """Key files the configs refer to: {key} good (0600), {loose} readable by
    others, {short} too short for aes128gcm16, {missing} absent."""
    k = {"key": write_key_file(tmp_path / "good.key", KEY20),
         "loose": write_key_file(tmp_path / "loose.key", KEY20),
         "short": write_key_file(tmp_path / "short.key", KEY20[:16]),
         "missing": tmp_path / "no-such.key"}
    os.chmod(k["loose"], 0o644)
    return {n: str(v) for n, v in k.items()}


def make_config(prefix, keys, replacements=()):
    """BASE with whole lines replaced: each `old` must be exactly one line of BASE;
    {key}, {loose}, {short}, {missing} in the result name the `keys` files (so
    TOML's own braces are written {{ }} in replacements)."""
    lines = BASE.split("\n")
    for old, new in replacements:
        idx = [i for i, line in enumerate(lines) if line == old]
        assert len(idx) == 1, f"test bug: line {old!r} occurs {len(idx)} times"
        lines[idx[0]:idx[0] + 1] = new.split("\n")
    return "\n".join(lines).format(eal=toml_value(eal_args(prefix)), **keys)


def nth_line_of(text, line, n):
    """1-based number of the n-th (1-based) line of `text` equal to `line`."""
    idx = [i for i, l in enumerate(text.split("\n")) if l == line]
    assert len(idx) >= n, f"test bug: line {line!r} occurs {len(idx)} times"
    return idx[n - 1] + 1


def line_of(text, line):
    """1-based number of the only line of `text` equal to `line`."""
    idx = [i for i, l in enumerate(text.split("\n")) if l == line]
    assert len(idx) == 1, f"test bug: line {line!r} occurs {len(idx)} times"
    return idx[0] + 1


# (id, replacements, line to point at (its text, several allowed, or a function of
# the config text), field (None: no `field` part, the key is in the message; several
# allowed), text the message must contain)
CASES = [
    ("bad-prefix-length", [('src = "10.0.0.0/24"', 'src = "10.0.0.0/33"')],
     'src = "10.0.0.0/33"', "policy[0].src", "prefix length 33"),
    ("bad-prefix-address", [('dst = "any"', 'dst = "10.0.0.300/24"')],
     'dst = "10.0.0.300/24"', "policy[0].dst", "10.0.0.300/24"),
    ("bad-prefix-v6-length", [('src = "2001:db8::/32"', 'src = "2001:db8::/129"')],
     'src = "2001:db8::/129"', "policy[1].src", "prefix length 129"),
    ("host-bits-set-v4", [('src = "10.0.0.0/24"', 'src = "10.0.0.1/24"')],
     'src = "10.0.0.1/24"', "policy[0].src", "did you mean 10.0.0.0/24"),
    ("host-bits-set-v6", [('src = "2001:db8::/32"', 'src = "2001:db8::1/32"')],
     'src = "2001:db8::1/32"', "policy[1].src", "host bits"),
    ("port-range-reversed", [('dport = "1000-2000"', 'dport = "2000-1000"')],
     'dport = "2000-1000"', "policy[0].dport", "2000-1000"),
    ("port-out-of-range", [('dport = "1000-2000"', 'dport = 70000')],
     'dport = 70000', "policy[0].dport", "70000"),
    ("port-range-end-out-of-range", [('dport = "1000-2000"', 'dport = "1000-65536"')],
     'dport = "1000-65536"', "policy[0].dport", "1000-65536"),
    ("port-not-a-number", [('sport = "any"', 'sport = "http"')],
     'sport = "http"', "policy[0].sport", "http"),
    ("unknown-proto", [('proto = "tcp"', 'proto = "tcpp"')],
     'proto = "tcpp"', "policy[0].proto", "tcpp"),
    ("proto-number-out-of-range", [('proto = 17', 'proto = 256')],
     'proto = 256', "policy[1].proto", "256"),
    ("protect-without-sa", [('sa = "to-hq"', '')],
     'action = "protect"', "policy[1].sa", "sa"),
    ("sa-on-bypass-rule", [('action = "bypass"', 'action = "bypass"\nsa = "some-sa"')],
     'sa = "some-sa"', "policy[0].sa", "protect"),
    ("sa-on-discard-rule", [('action = "bypass"', 'action = "discard"\nsa = "x"')],
     'sa = "x"', "policy[0].sa", "protect"),
    ("mixed-families-v4-src-v6-dst", [('dst = "any"', 'dst = "2001:db8::/32"')],
     'dst = "2001:db8::/32"', "policy[0].dst", "famil"),
    ("mixed-families-v6-src-v4-dst", [('proto = 17', 'dst = "10.0.0.0/8"\nproto = 17')],
     'dst = "10.0.0.0/8"', "policy[1].dst", "famil"),
    ("duplicate-rule-name", [('name = "hq"', 'name = "web"')],
     lambda text: nth_line_of(text, 'name = "web"', 2), "policy[1].name", "web"),
    ("unknown-key-dataplane", [('burst = 32', 'brust = 32')],
     'brust = 32', None, "brust"),
    ("unknown-key-policy", [('dport = 53', 'dprot = 53')],
     'dprot = 53', None, "dprot"),
    ("unknown-table", [('[dataplane]', '[dataplan]')],
     '[dataplan]', None, "dataplan"),
    ("workers-not-a-number", [('workers = 1', 'workers = "two"')],
     'workers = "two"', "dataplane.workers", "two"),
    ("missing-action", [('action = "bypass"', '')],
     lambda text: nth_line_of(text, "[[policy]]", 1), None, "action"),
    ("missing-direction", [('direction = "in"', '')],
     lambda text: nth_line_of(text, "[[policy]]", 2), None, "direction"),
    ("workers-zero", [('workers = 1', 'workers = 0')],
     'workers = 0', "dataplane.workers", "1 to 64"),
    ("workers-too-many", [('workers = 1', 'workers = 65')],
     'workers = 65', "dataplane.workers", "1 to 64"),
    ("burst-zero", [('burst = 32', 'burst = 0')],
     'burst = 0', "dataplane.burst", "burst"),
    ("descriptors-not-power-of-two", [('burst = 32', 'burst = 32\nrx_descriptors = 1000')],
     'rx_descriptors = 1000', "dataplane.rx_descriptors", "power of two"),
    ("unknown-default-action", [('default_action = "bypass"', 'default_action = "drop"')],
     'default_action = "drop"', "dataplane.default_action", "drop"),
    ("unknown-action", [('action = "bypass"', 'action = "allow"')],
     'action = "allow"', "policy[0].action", "allow"),
    ("unknown-direction", [('direction = "out"', 'direction = "outbound"')],
     'direction = "outbound"', "policy[0].direction", "outbound"),
    ("empty-device", [('device = "net_null1"', 'device = ""')],
     'device = ""', "ports.outside.device", "empty device"),
    ("cores-count", [('burst = 32', 'burst = 32\ncores = [0, 1]')],
     'cores = [0, 1]', "dataplane.cores", "2 cores"),
    # Cross-field checks: the line must be that of a field involved, and the
    # field named must be one that is set in the rule.
    ("ports-without-port-protocol", [('proto = "tcp"', 'proto = "any"')],
     ('proto = "any"', 'dport = "1000-2000"'), ("policy[0].proto", "policy[0].dport"), "proto"),
    ("icmp-with-ipv6-prefix", [('proto = 17', 'proto = "icmp"'), ('dport = 53', '')],
     ('proto = "icmp"', 'src = "2001:db8::/32"'), ("policy[1].proto", "policy[1].src"), "icmp"),
    ("icmp-type-above-255", [('proto = "tcp"', 'proto = "icmp"'), ('dport = "1000-2000"', 'dport = 0'),
                             ('sport = "any"', 'sport = 300')],
     ('sport = 300',), ("policy[0].sport",), "0 to 255"),
    # SAs. A protect rule's SA must exist and be of the rule's direction: the
    # message points at the rule (its header or its `sa` line).
    ("protect-names-unknown-sa", [('sa = "to-hq"', 'sa = "to-hx"')],
     lambda text: (nth_line_of(text, "[[policy]]", 2), line_of(text, 'sa = "to-hx"')), "policy[1].sa",
     "no [[sa]] is named `to-hx`"),
    ("protect-names-sa-of-other-direction", [('direction = "in"   # the SA', 'direction = "out"')],
     lambda text: (nth_line_of(text, "[[policy]]", 2), line_of(text, 'sa = "to-hq"')), "policy[1].sa",
     "out SA"),
    ("key-file-readable-by-others", [('key_file = "{key}"', 'key_file = "{loose}"')],
     lambda text: line_of(text, next(l for l in text.split("\n") if l.startswith("key_file"))),
     "sa[0].key_file", "chmod 600"),
    ("key-file-too-short", [('key_file = "{key}"', 'key_file = "{short}"')],
     lambda text: line_of(text, next(l for l in text.split("\n") if l.startswith("key_file"))),
     "sa[0].key_file", "holds 16 bytes; aes128gcm16 needs 20"),
    ("key-file-missing", [('key_file = "{key}"', 'key_file = "{missing}"')],
     lambda text: line_of(text, next(l for l in text.split("\n") if l.startswith("key_file"))),
     "sa[0].key_file", "cannot read the key file"),
    ("unknown-aead", [('aead = "aes128gcm16"', 'aead = "aes128cbc"')],
     'aead = "aes128cbc"', "sa[0].aead", "aes128cbc"),
    ("spi-not-a-number", [('spi = "0x00001001"', 'spi = "0xZZ"')],
     'spi = "0xZZ"', "sa[0].spi", "0xZZ"),
    ("spi-reserved", [('spi = "0x00001001"', 'spi = 255')],
     'spi = 255', "sa[0].spi", "reserved"),
    ("unknown-mode", [('mode = "tunnel"', 'mode = "tunel"')],
     'mode = "tunel"', "sa[0].mode", "tunel"),
    ("tunnel-without-destination", [('tunnel_dst = "2001:db8::2"', '')],
     ('mode = "tunnel"',), "sa[0].tunnel_dst", "tunnel_dst"),
    ("tunnel-families-mixed", [('tunnel_dst = "2001:db8::2"', 'tunnel_dst = "10.0.0.2"')],
     'tunnel_dst = "10.0.0.2"', "sa[0].tunnel_dst", "different address families"),
    ("transport-with-tunnel-addresses", [('mode = "tunnel"', 'mode = "transport"')],
     'tunnel_src = "2001:db8::1"', "sa[0].tunnel_src", "transport"),
    ("replay-window-on-outbound-sa", [('direction = "in"   # the SA', 'direction = "out"\nreplay_window = 64')],
     'replay_window = 64', "sa[0].replay_window", "inbound"),
    ("soft-lifetime-not-below-hard", [('aead = "aes128gcm16"',
                                       'aead = "aes128gcm16"\nlifetime_packets = {{ soft = 5, hard = 5 }}')],
     ('name = "to-hq"', 'lifetime_packets = { soft = 5, hard = 5 }'), "sa[0].lifetime_packets", "soft limit 5"),
    ("unknown-key-sa", [('aead = "aes128gcm16"', 'aead = "aes128gcm16"\nreplay = 64')],
     'replay = 64', None, "replay"),
]


def _assert_config_error(run, path, line, field, needle):
    assert run.returncode == EXIT_CONFIG, run.describe()
    assert run.stdout == "", f"a config error must not print a summary\n{run.describe()}"
    assert "panicked" not in run.stderr and "Traceback" not in run.stderr, run.describe()
    assert "EAL:" not in run.stderr, f"DPDK was started despite the bad config\n{run.describe()}"
    errors = [l for l in run.stderr.splitlines() if l.startswith("error: ")]
    assert len(errors) == 1, run.describe()
    err = errors[0]
    lines = line if isinstance(line, tuple) else (line,)
    fields = field if isinstance(field, tuple) else (field,)
    m = re.match(r"error: (.*?):(\d+): (.*)$", err)
    assert m, f"no FILE:LINE in {err!r}"
    assert m.group(1) == str(path), err
    assert int(m.group(2)) in lines, f"line {m.group(2)}, expected {' or '.join(map(str, lines))}: {err}"
    rest = m.group(3)
    if fields == (None,):
        assert not rest.startswith("field `")
    else:
        fm = re.match(r"field `([^`]*)`: ", rest)
        assert fm, f"no field in {err!r}"
        assert fm.group(1) in fields, f"field `{fm.group(1)}`, expected {' or '.join(fields)}: {err}"
    assert needle in rest, f"{needle!r} not in {err!r}"
    return err


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_config_is_rejected_with_file_line_and_field(dataplane, tmp_path, file_prefix, keys, case):
    name, replacements, at, field, needle = case
    text = make_config(file_prefix, keys, replacements)
    path = tmp_path / f"{name}.toml"
    path.write_text(text)
    if callable(at):
        want_line = at(text)
    elif isinstance(at, tuple):
        want_line = tuple(line_of(text, a) for a in at)
    else:
        want_line = line_of(text, at)

    checked = run_binary(dataplane, "--config", path, "--check", timeout=20)
    err_check = _assert_config_error(checked, path, want_line, field, needle)
    ran = run_binary(dataplane, "--config", path, "--run-for", 1, timeout=60)
    err_run = _assert_config_error(ran, path, want_line, field, needle)
    assert err_check == err_run


def test_good_config_check_passes(dataplane, tmp_path, file_prefix, keys):
    path = tmp_path / "good.toml"
    path.write_text(make_config(file_prefix, keys))
    r = run_binary(dataplane, "--config", path, "--check", timeout=20)
    assert r.returncode == EXIT_OK, r.describe()
    assert r.stdout == ""
    assert f"{path}: ok (2 rules, 1 workers)" in r.stderr, r.describe()
    assert "EAL:" not in r.stderr, "--check must not start DPDK"


@pytest.mark.parametrize("shipped", [
    "configs/reference.toml",
    "configs/demo.toml",
])
def test_shipped_configs_check(dataplane, shipped, demo_keys_private):
    r = run_binary(dataplane, "--config", REPO_ROOT / shipped, "--check", timeout=20, cwd=REPO_ROOT)
    assert r.returncode == EXIT_OK, r.describe()
    assert ": ok (" in r.stderr


def test_same_device_for_both_ports(dataplane, tmp_path, file_prefix, keys):
    path = tmp_path / "same.toml"
    path.write_text(make_config(file_prefix, keys, [('device = "net_null1"', 'device = "net_null0"')]))
    for args in (["--check"], ["--run-for", "1"]):
        r = run_binary(dataplane, "--config", path, *args, timeout=60)
        assert r.returncode == EXIT_CONFIG, r.describe()
        assert "EAL:" not in r.stderr
        assert f"error: {path}" in r.stderr
        assert "field `ports.outside.device`" in r.stderr and "net_null0" in r.stderr, r.describe()


@pytest.mark.parametrize("args", [["--check"], ["--run-for", "1"]], ids=["check", "run"])
def test_missing_config_file(dataplane, tmp_path, args):
    path = tmp_path / "does-not-exist.toml"
    r = run_binary(dataplane, "--config", path, *args, timeout=30)
    assert r.returncode == EXIT_CONFIG, r.describe()
    assert r.stdout == ""
    assert f"error: {path}: cannot read the file" in r.stderr, r.describe()
    assert "No such file" in r.stderr
    assert "panicked" not in r.stderr and "EAL:" not in r.stderr


@pytest.mark.parametrize("value", ["0", "-1", "=-1", "=-0.5", "nan", "inf", "abc", ""])
def test_run_for_must_be_positive(dataplane, tmp_path, file_prefix, keys, value):
    path = tmp_path / "good.toml"
    path.write_text(make_config(file_prefix, keys))
    args = [f"--run-for{value}"] if value.startswith("=") else ["--run-for", value]
    r = run_binary(dataplane, "--config", path, *args, timeout=30)
    assert r.returncode == EXIT_CONFIG, r.describe()
    assert r.stdout == "", "no summary: nothing ran"
    assert "EAL:" not in r.stderr, "DPDK must not start with a bad --run-for"
    assert "error:" in r.stderr and "panicked" not in r.stderr, r.describe()
    if value in ("0", "=-1", "=-0.5", "nan", "inf"):
        assert "--run-for" in r.stderr and "positive" in r.stderr, r.describe()
