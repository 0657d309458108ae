"""Filename rewrite rules in tftpd-hpa's `--map-file` syntax, for the directory backend.

Operators moving from tftpd-hpa bring rule files that fix what ROMs ask for
(backslashes, drive letters, case, a per-client config name). Each line is
`FLAGS REGEX [REPLACEMENT]`; rules run top down on the name as the client
sent it, and what comes out is confined to the root exactly like a requested
name. Everything is bytes: names need not be UTF-8, and case folding is
ASCII, as tftpd-hpa's C locale does it. What this module cannot do the way
tftpd-hpa does is refused when the file is read, with the line that says it,
never guessed at (see docs/remap.md for the supported subset).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import List, Optional, Pattern, Tuple, Union

from .errors import AccessViolation

MAX_STEPS = 1000
"""Rewrites (a `g` rule's repeats, `s` restarts) one name may take; a looping rule file refuses."""

FLAGS = frozenset("rgiesaGP46~")

# Replacement parts: bytes are literal, ints are groups (0 = the whole match), str are
# macros ("i", "x") and case switches ("U", "L", "E").
Part = Union[bytes, int, str]

_POSIX_CLASSES = {
    b"alpha": b"a-zA-Z", b"digit": b"0-9", b"alnum": b"a-zA-Z0-9", b"upper": b"A-Z", b"lower": b"a-z",
    b"space": b" \\t\\n\\r\\f\\v", b"blank": b" \\t", b"punct": re.escape(bytes(range(33, 48)) + bytes(range(58, 65))
                                                                       + bytes(range(91, 97)) + bytes(range(123, 127))),
    b"xdigit": b"0-9A-Fa-f", b"cntrl": b"\\x00-\\x1f\\x7f", b"print": b"\\x20-\\x7e", b"graph": b"\\x21-\\x7e",
}
_REGEX_ESCAPES = {b"<": b"\\b", b">": b"\\b", b"`": b"\\A", b"'": b"\\Z",
                  b"w": b"\\w", b"W": b"\\W", b"s": b"\\s", b"S": b"\\S", b"b": b"\\b", b"B": b"\\B"}
"""GNU regex escapes egrep knows, as Python's re writes them; other letter escapes mean different things."""
_QUANTIFIERS = b"*+?{"


class MapFileError(ValueError):
    """A rule file that cannot be used: the message is one line naming file, line and cause."""


@dataclass(frozen=True)
class Rule:
    line: int
    flags: str
    regex: "Pattern[bytes]"
    replacement: Tuple[Part, ...]

    def applies(self, ipv6: bool) -> bool:
        if "P" in self.flags:  # put (write) only: this server never writes
            return False
        return not (("4" in self.flags and ipv6) or ("6" in self.flags and not ipv6))


class Refused(AccessViolation):
    """An `a` rule matched (or the rules loop): the client gets an access violation."""

    def __init__(self, message: str, line: int) -> None:
        super().__init__(message)
        self.line = line


class RuleSet:
    """The rules of one file, applied with `rewrite(name, client_host)`."""

    def __init__(self, rules: List[Rule], source: str = "") -> None:
        self.rules = rules
        self.source = source

    @classmethod
    def load(cls, path: str) -> "RuleSet":
        try:
            with open(path, "rb") as f:
                text = f.read()
        except OSError as e:
            raise MapFileError(f"{path}: cannot read the map file: {e.strerror}") from None
        return cls.parse(text, path)

    @classmethod
    def parse(cls, text: bytes, source: str = "map file") -> "RuleSet":
        rules = []
        for number, line in enumerate(text.splitlines(), 1):
            try:
                rule = _parse_line(line, number)
            except MapFileError as e:
                raise MapFileError(f"{source} line {number}: {e}") from None
            if rule is not None:
                rules.append(rule)
        return cls(rules, source)

    def rewrite(self, name: bytes, client: str) -> bytes:
        """`name` after the rules, for a request from `client` (an address); raises `Refused`."""
        ipv6 = ":" in client
        steps = 0
        index = 0
        rules = self.rules
        while index < len(rules):
            rule = rules[index]
            index += 1
            if not rule.applies(ipv6):
                continue
            match = rule.regex.search(name)
            if (match is None) != ("~" in rule.flags):
                continue
            if "a" in rule.flags:
                raise Refused(f"Access violation: refused by rule at line {rule.line}", rule.line)
            if "r" in rule.flags:
                while match is not None:
                    steps += 1
                    if steps > MAX_STEPS:
                        raise Refused(f"Access violation: the rule at line {rule.line} loops", rule.line)
                    name = name[:match.start()] + _expand(rule.replacement, match, client) + name[match.end():]
                    match = rule.regex.search(name) if "g" in rule.flags else None
            if "e" in rule.flags:
                break
            if "s" in rule.flags:
                steps += 1
                if steps > MAX_STEPS:
                    raise Refused(f"Access violation: the rule at line {rule.line} loops", rule.line)
                index = 0
        return name


def _fields(line: bytes) -> List[bytes]:
    """Split on unescaped whitespace and stop at an unescaped `#`; escapes stay for the next step."""
    fields: List[bytes] = []
    current = bytearray()
    i = 0
    while i < len(line):
        char = line[i:i + 1]
        if char == b"\\" and i + 1 < len(line):
            current += line[i:i + 2]
            i += 2
            continue
        if char == b"#":
            break
        if char.isspace():
            if current:
                fields.append(bytes(current))
                current = bytearray()
        else:
            current += char
        i += 1
    if current:
        fields.append(bytes(current))
    return fields


def _parse_line(line: bytes, number: int) -> Optional[Rule]:
    fields = _fields(line)
    if not fields:
        return None
    if len(fields) > 3:
        raise MapFileError(f"expected FLAGS REGEX [REPLACEMENT], found {len(fields)} fields "
                           "(escape spaces as '\\ ')")
    flags = fields[0].decode("ascii", "replace")
    unknown = sorted(set(flags) - FLAGS)
    if unknown:
        raise MapFileError(f"unsupported flag {unknown[0]!r} in {flags!r} (supported: r g i e s a G P 4 6 ~)")
    if len(fields) < 2:
        raise MapFileError("a rule needs a regex after its flags")
    if "r" not in flags and len(fields) == 3:
        raise MapFileError("a replacement is only used with the 'r' flag")
    if "~" in flags and "r" in flags:
        raise MapFileError("'~' (inverse) cannot be combined with 'r': there is no match to replace")
    if "4" in flags and "6" in flags:
        raise MapFileError("'4' and '6' together match no request")
    regex = _compile(fields[1], re.IGNORECASE if "i" in flags else 0)
    replacement = _template(fields[2]) if len(fields) == 3 else ()  # none: the match is removed
    return Rule(number, flags, regex, replacement)


def _compile(ere: bytes, flags: int) -> "Pattern[bytes]":
    """A POSIX extended regex (egrep's) as Python's re, or MapFileError naming what differs."""
    out = bytearray()
    i = 0
    last_was_quantifier = False
    while i < len(ere):
        char = ere[i:i + 1]
        if char == b"\\":
            if i + 1 >= len(ere):
                raise MapFileError("regex ends with a lone '\\'")
            escaped = ere[i + 1:i + 2]
            if escaped in _REGEX_ESCAPES:
                out += _REGEX_ESCAPES[escaped]
            elif escaped.isdigit() and escaped != b"0":
                out += b"\\" + escaped  # a back-reference, as GNU egrep reads it
            elif escaped.isalnum():
                raise MapFileError(f"unsupported escape '\\{escaped.decode('latin-1')}' in the regex")
            else:
                out += re.escape(escaped)
            i += 2
            last_was_quantifier = False
            continue
        if char == b"[":
            i = _bracket(ere, i, out)
            last_was_quantifier = False
            continue
        if char in b"*+?" or (char == b"{" and re.match(rb"\{\d+(,\d*)?\}", ere[i:])):
            if last_was_quantifier:
                raise MapFileError("unsupported repeated quantifier (such as '*?' or '+*') in the regex")
            if char == b"{":
                end = ere.index(b"}", i) + 1
                out += ere[i:end]
                i = end
            else:
                out += char
                i += 1
            last_was_quantifier = True
            continue
        if char == b"(" and ere[i + 1:i + 2] == b"?":
            raise MapFileError("'(?' is not POSIX regex syntax")
        # POSIX '$' is the end of the name; Python's would also match before a final newline.
        out += b"\\Z" if char == b"$" else re.escape(char) if char in b"{}" else char
        last_was_quantifier = False
        i += 1
    try:
        return re.compile(bytes(out), flags)
    except re.error as e:
        raise MapFileError(f"bad regex {ere.decode('latin-1')!r}: {e}") from None


def _bracket(ere: bytes, start: int, out: bytearray) -> int:
    """Translate the bracket expression at `start`; returns the index after its `]`."""
    i = start + 1
    out += b"["
    if ere[i:i + 1] == b"^":
        out += b"^"
        i += 1
    first = True
    while True:
        if i >= len(ere):
            raise MapFileError("unterminated '[' in the regex")
        char = ere[i:i + 1]
        if char == b"]" and not first:
            out += b"]"
            return i + 1
        if ere[i:i + 2] == b"[:":
            end = ere.find(b":]", i + 2)
            name = ere[i + 2:end] if end > 0 else b""
            if name not in _POSIX_CLASSES:
                shown = ere[i:end + 2 if end > 0 else None].decode("latin-1")
                raise MapFileError(f"unsupported character class '{shown}' in the regex")
            out += _POSIX_CLASSES[name]
            i = end + 2
        elif ere[i:i + 2] in (b"[=", b"[."):
            raise MapFileError("collating elements ('[=' and '[.') are not supported in the regex")
        elif char == b"-":
            out += b"-"  # a range, or literal first and last, in both dialects
            i += 1
        else:
            out += re.escape(char)  # '\' is literal in a POSIX bracket, and '[' '&' '~' '|' are in Python
            i += 1
        first = False


def _template(text: bytes) -> Tuple[Part, ...]:
    """The replacement pattern as parts; escapes as tftpd-hpa documents them, plus `\\&` (sed's whole match)."""
    parts: List[Part] = []
    literal = bytearray()
    i = 0
    while i < len(text):
        char = text[i:i + 1]
        if char != b"\\":
            literal += char
            i += 1
            continue
        if i + 1 >= len(text):
            raise MapFileError("replacement ends with a lone '\\'")
        escaped = text[i + 1:i + 2]
        i += 2
        part: Optional[Part] = None
        if escaped.isdigit():
            part = int(escaped)
        elif escaped == b"&":
            part = 0
        elif escaped in (b"i", b"x", b"U", b"L", b"E"):
            part = escaped.decode()
        elif escaped.isalnum():
            raise MapFileError(f"unsupported escape '\\{escaped.decode('latin-1')}' in the replacement "
                               "(supported: \\0-\\9 \\& \\i \\x \\U \\L \\E)")
        else:
            literal += escaped  # \\, \#, \<space> and other punctuation stand for themselves
        if part is not None:
            if literal:
                parts.append(bytes(literal))
                literal = bytearray()
            parts.append(part)
    if literal:
        parts.append(bytes(literal))
    return tuple(parts)


def _expand(parts: Tuple[Part, ...], match: "re.Match[bytes]", client: str) -> bytes:
    out = bytearray()
    case = ""
    for part in parts:
        if isinstance(part, str) and part in "ULE":
            case = "" if part == "E" else part
            continue
        if isinstance(part, bytes):
            piece = part
        elif isinstance(part, int):
            piece = (match.group(part) if part <= (match.re.groups or 0) else None) or b""
        else:
            piece = client_macro(part, client)
        out += piece.upper() if case == "U" else piece.lower() if case == "L" else piece
    return bytes(out)


def client_macro(macro: str, client: str) -> bytes:
    """`\\i`: the address as written (IPv4 dotted, IPv6 compressed); `\\x`: upper-case hex,
    8 digits for IPv4 (pxelinux's config names), 32 for IPv6, as tftpd-hpa writes them."""
    try:
        address = ipaddress.ip_address(client.split("%", 1)[0])
    except ValueError:
        return client.encode("ascii", "replace")
    if macro == "i":
        return str(address).encode("ascii")
    return address.packed.hex().upper().encode("ascii")
