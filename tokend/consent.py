"""Who asks, and may they: the values and seams behind the protected authentication path
and the per-program policy (no I/O here).

The session engine asks two seams, both optional:

* a `PinPrompter` when `C_Login` comes without a PIN on a token configured for the
  protected authentication path — the PIN is typed into a prompt the daemon owns
  (`tokend.pinentry`), never through the mail client;
* an `Authorizer` before every private-key use and every provisioning call — the
  configured `Policy` (which executables may use which token for what), optionally with a
  confirmation prompt.

What the policy can and cannot promise is in docs/threat-model.md: the program's identity
comes from the kernel (SO_PEERCRED → /proc/PID/exe), which a program of the same user can
still defeat (ptrace, LD_PRELOAD into an allowed program); it is consent, not isolation.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol


class Use(StrEnum):
    """What a client wants to do with a token (the policy's `operations` words)."""

    DECRYPT = "decrypt"
    SIGN = "sign"
    DERIVE = "derive"
    PROVISION = "provision"

    @classmethod
    def from_word(cls, word: str) -> Use:
        """An `operations` word; "provisioning" (the issue's and the docs' word) and
        "provision" (how refusals and `tokenctl policy` spell it) are the same use."""
        return cls(_USE_SYNONYMS.get(word, word))


#: Other spellings a policy may use for an operation.
_USE_SYNONYMS = {"provisioning": Use.PROVISION.value}
#: The words a policy accepts, for error messages.
USE_WORDS = ("decrypt", "sign", "derive", "provisioning", "provision")


@dataclass(frozen=True)
class ClientInfo:
    """A socket peer as the kernel describes it (SO_PEERCRED, then /proc/PID)."""

    pid: int = 0
    uid: int = -1
    exe: str = ""
    cmdline: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        """What a prompt or a log line calls the program."""
        program = self.exe or (self.cmdline[0] if self.cmdline else "")
        return f"{program or 'an unknown program'} (pid {self.pid})"

    @property
    def command_line(self) -> str:
        return " ".join(self.cmdline)


@dataclass(frozen=True)
class TokenDescription:
    slot_id: int
    label: str
    serial: str

    @property
    def name(self) -> str:
        return f"{self.label} (serial {self.serial}, slot {self.slot_id})"


@dataclass(frozen=True)
class PinRequest:
    client: ClientInfo
    token: TokenDescription
    attempt: int  # 1 for the first prompt of this C_Login
    error: str = ""  # why the previous attempt failed ("Wrong PIN, 2 tries left")


@dataclass(frozen=True)
class UseRequest:
    client: ClientInfo
    token: TokenDescription
    use: Use


class PinPrompter(Protocol):
    async def ask_pin(self, request: PinRequest) -> bytearray:
        """The PIN the user typed; raise FunctionCanceledError on cancel or timeout."""
        ...


class Authorizer(Protocol):
    async def authorize(self, request: UseRequest) -> None:
        """Return to allow; raise FunctionRejectedError (or FunctionCanceledError) to refuse."""
        ...


# --- the policy --------------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    """One `[[policy]]` table: a program (exact path or shell pattern), the tokens it may use
    (serials or labels, patterns allowed; `*` = every token), what for, and whether each use
    asks the user to confirm."""

    program: str
    tokens: tuple[str, ...] = ("*",)
    operations: frozenset[Use] = frozenset(Use)
    confirm: bool = False

    def matches_program(self, client: ClientInfo) -> bool:
        return bool(client.exe) and fnmatch.fnmatchcase(client.exe, self.program)

    def matches_token(self, token: TokenDescription) -> bool:
        return any(
            fnmatch.fnmatchcase(token.serial, pattern) or fnmatch.fnmatchcase(token.label, pattern)
            for pattern in self.tokens
        )


@dataclass(frozen=True)
class Decision:
    allowed: bool
    confirm: bool = False
    reason: str = ""


_RULE_KEYS = {"program", "tokens", "operations", "confirm"}


@dataclass(frozen=True)
class Policy:
    """Per-program policy. With no rules every program of the user may do everything (the
    behaviour before policies existed); with rules, a use is allowed only by a rule that
    names the program, the token and the operation — the first such rule decides whether to
    confirm."""

    rules: tuple[Rule, ...] = ()
    confirm_window: float = 300.0  # seconds one confirmation covers (per program, token, use)

    @property
    def enforced(self) -> bool:
        return bool(self.rules)

    def decide(self, request: UseRequest) -> Decision:
        if not self.rules:
            return Decision(True)
        for rule in self.rules:
            if not rule.matches_program(request.client) or not rule.matches_token(request.token):
                continue
            if request.use in rule.operations:
                return Decision(True, rule.confirm, f"allowed by the rule for {rule.program}")
        return Decision(
            False,
            reason=(
                f"{request.client.name} may not {request.use.value} with "
                f"{request.token.name}: no policy rule allows it"
            ),
        )

    @classmethod
    def from_config(
        cls, rules: Iterable[Mapping[str, Any]], confirm_window: float = 300.0
    ) -> Policy:
        """Build from the configuration's `[[policy]]` tables; ValueError names the bad key."""
        parsed = []
        for index, table in enumerate(rules):
            where = f"policy[{index}]"
            if not isinstance(table, Mapping):
                raise ValueError(f"{where}: must be a table")
            unknown = set(table) - _RULE_KEYS
            if unknown:
                raise ValueError(f"{where}: unknown key {sorted(unknown)[0]!r}")
            program = table.get("program")
            if not isinstance(program, str) or not program:
                raise ValueError(f"{where}.program: must be a path or pattern")
            tokens = _strings(table.get("tokens", ["*"]), f"{where}.tokens")
            words = _strings(table.get("operations", [u.value for u in Use]), f"{where}.operations")
            try:
                operations = frozenset(Use.from_word(word) for word in words)
            except ValueError:
                known = ", ".join(USE_WORDS)
                raise ValueError(f"{where}.operations: use only {known}") from None
            confirm = table.get("confirm", False)
            if not isinstance(confirm, bool):
                raise ValueError(f"{where}.confirm: must be true or false")
            parsed.append(Rule(program, tuple(tokens), operations, confirm))
        if not isinstance(confirm_window, int | float) or confirm_window < 0:
            raise ValueError("confirm_window: must be a number of seconds >= 0")
        return cls(tuple(parsed), float(confirm_window))

    def describe(self) -> list[dict[str, Any]]:
        return [
            {
                "program": rule.program,
                "tokens": list(rule.tokens),
                "operations": sorted(u.value for u in rule.operations),
                "confirm": rule.confirm,
            }
            for rule in self.rules
        ]


def _strings(value: object, where: str) -> Sequence[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{where}: must be a list of strings")
    return value


@dataclass(frozen=True)
class Refusal:
    """A refused use, kept for `tokenctl policy` (the most recent ones only)."""

    time: float
    client: ClientInfo
    token: TokenDescription
    use: Use
    reason: str
