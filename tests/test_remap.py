"""Rewrite rules (tftp_offload.remap): tftpd-hpa's --map-file syntax, what is refused and why,
`tftp-offload-map-test`, and `--map-file` on a real twistd (served, confined, reread on SIGHUP)."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import List

import pytest

from tests.support import tftp_client
from tests.support.harness import REPO, StartServer
from tftp_offload.errors import AccessViolation, error_for
from tftp_offload.maptest import main as map_test
from tftp_offload.remap import MAX_STEPS, MapFileError, Refused, RuleSet, client_macro

# tftpd-hpa's own sample.rules (Debian's /usr/share/doc/tftpd-hpa/examples), comments and all.
SAMPLE = rb"""#
# Sample rule file for the -m (remapping option)
#
ri	^[a-z]:				# Remove "drive letters"
rg	\\		/		# Convert backslashes to slashes
rg	\#		@		# Convert hash marks to @ signs
rg	/../		/..no../	# Convert /../ to /..no../
e	^ok/				# These are always ok
r	^[^/]		/tftpboot/\0	# Convert non-absolute files
a	\.pvt$				# Reject requests for private files
"""


def rewrite(rules: bytes, name: bytes, client: str = "192.0.2.169") -> bytes:
    return RuleSet.parse(rules).rewrite(name, client)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        (b"C:\\boot\\bcd", b"/boot/bcd"),
        (b"c:pxelinux.0", b"/tftpboot/pxelinux.0"),
        (b"ok/anything", b"ok/anything"),  # 'e': no later rule runs
        (b"a#b#c", b"/tftpboot/a@b@c"),
        (b"/x/../y", b"/x/..no../y"),
        (b"/already/absolute", b"/already/absolute"),
    ],
)
def test_tftpd_hpa_sample_rules(name: bytes, expected: bytes) -> None:
    assert rewrite(SAMPLE, name) == expected


def test_abort_flag_refuses_with_the_line() -> None:
    with pytest.raises(Refused) as caught:
        rewrite(SAMPLE, b"keys.pvt")
    assert caught.value.line == 10
    assert isinstance(caught.value, AccessViolation)
    assert error_for(caught.value)[:2] == (2, "Access violation: refused by rule at line 10")


def test_rules_run_in_order_on_the_rewritten_name() -> None:
    assert rewrite(b"r a b\nr b c\n", b"a") == b"c"
    assert rewrite(b"r b c\nr a b\n", b"a") == b"b"


def test_without_g_only_the_first_match_is_replaced() -> None:
    assert rewrite(b"r a x\n", b"banana") == b"bxnana"
    assert rewrite(b"rg a x\n", b"banana") == b"bxnxnx"


def test_case_insensitive() -> None:
    assert rewrite(b"ri ^PXELINUX pxelinux\n", b"PxeLinux.0") == b"pxelinux.0"
    assert rewrite(b"r ^PXELINUX pxelinux\n", b"PxeLinux.0") == b"PxeLinux.0"


def test_restart_and_end() -> None:
    rules = b"r ^a/ b/\nrs ^c/ a/\ne ^b/stop\nr ^b/ done/\n"
    assert rewrite(rules, b"c/x") == b"done/x"  # restarted: the first rule sees a/x
    assert rewrite(rules.replace(b"rs", b"r "), b"c/x") == b"a/x"  # without 's' it does not
    assert rewrite(rules, b"c/stop") == b"b/stop"  # restarted, then ended


def test_inverse_flag() -> None:
    assert rewrite(b"a~ ^(pxelinux|boot)\n", b"boot/x") == b"boot/x"
    with pytest.raises(Refused):
        rewrite(b"a~ ^(pxelinux|boot)\n", b"etc/passwd")
    assert rewrite(b"e~ ^x\nr .* y\n", b"abc") == b"abc"


def test_get_put_and_family_flags() -> None:
    rules = b"rG ^a b\nrP ^b c\nr4 ^b v4\nr6 ^b v6\n"
    assert rewrite(rules, b"a", "192.0.2.1") == b"v4"  # G applies, P never does (read-only)
    assert rewrite(rules, b"a", "2001:db8::1") == b"v6"


def test_back_references_and_whole_match() -> None:
    assert rewrite(rb"r ^([a-z]+)-([0-9]+)$ \2/\1/\0/\&", b"img-42") == b"42/img/img-42/img-42"
    assert rewrite(rb"r ^(a)|(b)$ [\1\2\9]", b"b") == b"[b]"  # unmatched and absent groups: empty


def test_client_macros() -> None:
    rules = rb"r ^pxelinux.cfg/default$ pxelinux.cfg/\x" + b"\n" + rb"r ^who$ \i"
    assert rewrite(rules, b"pxelinux.cfg/default", "192.0.2.169") == b"pxelinux.cfg/C00002A9"
    assert rewrite(rules, b"who", "192.0.2.169") == b"192.0.2.169"
    assert rewrite(rules, b"pxelinux.cfg/default", "2001:db8::1") == b"pxelinux.cfg/20010DB8000000000000000000000001"
    assert rewrite(rules, b"who", "2001:db8::1") == b"2001:db8::1"
    assert client_macro("i", "fe80::2%eth0") == b"fe80::2"


def test_case_conversion() -> None:
    assert rewrite(rb"r ^([a-z]+)\.(.*)$ \U\1\E.\L\2", b"boot.EFI") == b"BOOT.efi"
    assert rewrite(rb"r ^ \Uclient-\x-", b"x", "192.0.2.169") == b"CLIENT-C00002A9-x"


def test_escapes_in_fields() -> None:
    # '\ ' keeps a space inside a field, '\#' is no comment, '\\' a backslash.
    assert rewrite(rb"r a\ b a\#b\\ # comment", b"xa b") == b"xa#b\\"


def test_posix_classes_and_anchors() -> None:
    assert rewrite(b"rg [[:upper:]] _\n", b"aBcD") == b"a_c_"
    assert rewrite(b"rg [[:digit:][:space:]] -\n", b"a1 2") == b"a---"
    assert rewrite(b"r x$ y\n", b"x\n") == b"x\n"  # POSIX '$' is the end: not before a newline
    assert rewrite(b"r \\<b X\n", b"ab b") == b"ab X"
    assert rewrite(b"r [\\] /\n", b"a\\b") == b"a/b"  # '\' is literal in a POSIX bracket


def test_non_utf8_names() -> None:
    assert rewrite(b"r \xe9 e\n", b"caf\xe9") == b"cafe"


def test_a_looping_rule_is_refused_not_endless() -> None:
    with pytest.raises(Refused, match="loops"):
        rewrite(b"rg a aa\n", b"a")
    with pytest.raises(Refused, match="loops"):
        rewrite(b"s .\n", b"a")
    # A long name with many matches is not a loop.
    assert rewrite(b"rg \\\\ /\n", b"\\" * (MAX_STEPS - 1)) == b"/" * (MAX_STEPS - 1)


@pytest.mark.parametrize(
    ("line", "complaint"),
    [
        (b"rx a b", "unsupported flag 'x'"),
        (b"r", "needs a regex"),
        (b"e a b", "only used with the 'r' flag"),
        (b"r a b c", "found 4 fields"),
        (b"r~ a b", "cannot be combined with 'r'"),
        (b"e46 a", "match no request"),
        (b"r a[[:word:]] b", "unsupported character class '[:word:]'"),
        (b"r [[=a=]] b", "collating elements"),
        (b"r \\d b", "unsupported escape '\\d' in the regex"),
        (b"r a*? b", "repeated quantifier"),
        (b"r (?i)a b", "'(?' is not POSIX"),
        (b"r a( b", "bad regex"),
        (b"r [abc b", "unterminated '['"),
        (b"r a \\n", "unsupported escape '\\n' in the replacement"),
        (b"r a b\\", "lone"),
    ],
)
def test_refused_lines_name_file_line_and_cause(line: bytes, complaint: str) -> None:
    with pytest.raises(MapFileError) as caught:
        RuleSet.parse(b"# first line\n\n" + line + b"\n", "/etc/tftp.map")
    message = str(caught.value)
    assert message.startswith("/etc/tftp.map line 3: "), message
    assert complaint in message
    assert "\n" not in message


def test_unreadable_map_file(tmp_path: Path) -> None:
    with pytest.raises(MapFileError, match="cannot read the map file"):
        RuleSet.load(str(tmp_path / "missing.map"))


def test_empty_and_comment_only_files_have_no_rules() -> None:
    assert RuleSet.parse(b"").rules == []
    assert RuleSet.parse(b"# nothing\n   \n\t# more\n").rewrite(b"x", "192.0.2.1") == b"x"


# ------------------------------------------------------------------ tftp-offload-map-test --


@pytest.fixture
def map_file(tmp_path: Path) -> Path:
    path = tmp_path / "tftp.map"
    path.write_bytes(rb"r ^pxelinux.cfg/default$ pxelinux.cfg/\x" + b"\n" + SAMPLE)
    return path


def run_map_test(*args: str, stdin: str = "") -> List[str]:
    out = io.StringIO()
    assert map_test(list(args), stdin=io.StringIO(stdin), stdout=out) == 0
    return out.getvalue().splitlines()


def test_map_test_names_as_arguments(map_file: Path) -> None:
    assert run_map_test(str(map_file), "--client", "192.0.2.169", "C:\\boot\\bcd", "/pxelinux.cfg/default",
                        "x.pvt") == [
        "C:\\boot\\bcd -> /boot/bcd",
        "/pxelinux.cfg/default -> /pxelinux.cfg/default",
        "x.pvt -> refused by rule at line 11",
    ]


def test_map_test_names_on_stdin_with_a_root(map_file: Path, tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "tftpboot" / "pxelinux.cfg").mkdir(parents=True)
    (root / "tftpboot" / "pxelinux.cfg" / "C00002A9").write_text("config")
    lines = run_map_test(str(map_file), "--client", "192.0.2.169", "--root", str(root),
                         stdin="pxelinux.cfg/default\nmissing\n\n")
    served = root.resolve() / "tftpboot"
    assert lines == [f"pxelinux.cfg/default -> /tftpboot/pxelinux.cfg/C00002A9 -> {served}/pxelinux.cfg/C00002A9",
                     f"missing -> /tftpboot/missing -> {served}/missing (not found)"]


def test_map_test_console_script_and_bad_file(map_file: Path, tmp_path: Path) -> None:
    """The installed entry point (setup.cfg) runs, and a bad file is one line on stderr, exit 2."""
    script = Path(sys.executable).parent / "tftp-offload-map-test"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "tftp_offload.maptest"]
    done = subprocess.run([*command, str(map_file), "c:\\x"], capture_output=True, text=True, timeout=30,
                          check=False, cwd=REPO)
    assert (done.returncode, done.stdout) == (0, "c:\\x -> /x\n"), done.stderr
    bad = tmp_path / "bad.map"
    bad.write_text("r a b\nq a\n")
    done = subprocess.run([*command, str(bad), "x"], capture_output=True, text=True, timeout=30, check=False,
                          cwd=REPO)
    assert done.returncode == 2
    assert done.stderr == f"tftp-offload-map-test: {bad} line 2: unsupported flag 'q' in 'q' " \
                          "(supported: r g i e s a G P 4 6 ~)\n"


# ------------------------------------------------------------------------- real twistd --


def wait_for(predicate, what: str, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_twistd_map_file(twistd_factory: StartServer, tmp_path: Path) -> None:
    """Rewritten on the wire, confined like any name, refused by 'a', reread on SIGHUP; a bad
    file on SIGHUP keeps the old rules and logs one line."""
    root = tmp_path / "root"
    (root / "boot").mkdir(parents=True)
    (root / "hello.txt").write_bytes(b"hello\n")
    (root / "boot" / "bcd").write_bytes(b"bcd\n")
    (root / "pxelinux.cfg").mkdir()
    (root / "pxelinux.cfg" / "7F000001").write_bytes(b"for 127.0.0.1\n")
    (tmp_path / "secret").write_bytes(b"outside")
    rules = tmp_path / "tftp.map"
    rules.write_bytes(rb"""ri ^[a-z]: # drive letters
rg \\ /
r ^pxelinux.cfg/default$ pxelinux.cfg/\x
r ^escape$ ../secret
r ^abs$ /etc/passwd
a \.pvt$
""")
    server = twistd_factory("--map-file", str(rules), hosts=("127.0.0.1",), root=root)
    host, port = server.host, server.port
    assert tftp_client.get(host, port, b"C:\\BOOT\\bcd").error == (1, "File not found")  # case is kept
    assert tftp_client.get(host, port, b"c:\\boot\\bcd").data == b"bcd\n"
    assert tftp_client.get(host, port, b"pxelinux.cfg/default").data == b"for 127.0.0.1\n"
    assert tftp_client.get(host, port, b"escape").error == (2, "Access violation: '..' in filename")
    assert tftp_client.get(host, port, b"abs").error == (1, "File not found")  # /etc/passwd inside the root
    assert tftp_client.get(host, port, b"x.pvt").error == (2, "Access violation: refused by rule at line 6")

    rules.write_bytes(b"r ^greeting$ hello.txt\n")
    os.kill(server.pid, signal.SIGHUP)
    wait_for(lambda: "Loaded 1 rewrite rules from" in server.log(), "the reload")
    assert tftp_client.get(host, port, b"greeting").data == b"hello\n"

    rules.write_bytes(b"r ^greeting$ hello.txt\nrz broken\n")
    os.kill(server.pid, signal.SIGHUP)
    wait_for(lambda: "Kept the previous rewrite rules" in server.log(), "the refusal")
    [line] = [line for line in server.log().splitlines() if "Kept the previous rewrite rules" in line]
    assert line.endswith(f"Kept the previous rewrite rules: {rules} line 2: unsupported flag 'z' in 'rz' "
                         "(supported: r g i e s a G P 4 6 ~)")
    assert tftp_client.get(host, port, b"greeting").data == b"hello\n"
    server.assert_healthy()


@pytest.mark.parametrize(
    ("args", "complaint"),
    [
        (["--map-file", "{bad}"], "--map-file {bad} line 1: unsupported flag 'q'"),
        (["--map-file", "{missing}"], "--map-file {missing}: cannot read the map file"),
    ],
)
def test_twistd_refuses_a_bad_map_file_in_one_line(tmp_path: Path, args: List[str], complaint: str) -> None:
    bad = tmp_path / "bad.map"
    bad.write_text("q a\n")
    values = {"bad": str(bad), "missing": str(tmp_path / "missing.map")}
    cmd = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n", "--pidfile=",
           "--logfile", str(tmp_path / "log"), "tftp-offload", "--root", str(tmp_path), "--listen", "127.0.0.1:0",
           *[arg.format(**values) for arg in args]]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False, env=env)
    assert done.returncode != 0
    assert complaint.format(**values) in done.stderr + done.stdout
    assert "Traceback" not in done.stderr + done.stdout


def test_help_and_readme_carry_the_options() -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "tftp-offload",
                           "--help"], capture_output=True, text=True, timeout=60, check=False, env=env)
    readme = (REPO / "README.md").read_text()
    for option in ("--map-file", "--root-per-client"):
        assert f"{option}=" in done.stdout, done.stdout
        assert f"| `{option} " in readme
