"""How the session consults the rules engine, cheaply.

Which rules match is a property of the statement's shape (kind, tables, fingerprint, normalized
text, WHERE/LIMIT presence) and the session context, never of its literal values. So the shape's
facts decide first; only when some rule matches is the statement's own text analysed, because what
the rule then does (a LIMIT to splice, literals to carry into a template) depends on that text.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from proxy.log import log
from proxy.rules import PASS, Decision, RuleHolder
from proxy.sql import analyze

if TYPE_CHECKING:
    from proxy.app import App
    from proxy.net.client import ClientConnection as Session
    from proxy.sql import StatementInfo


class RulesAdapter:
    def __init__(self, holder: RuleHolder, app: App) -> None:
        self.holder = holder
        self.app = app

    def decide_for(self, session: Session, sql: str, shape: StatementInfo) -> Decision | None:
        """The decision for this text, or None when no rule matches (the common case)."""
        rs = self.holder.current
        d = rs.decide(shape, session)
        if d is PASS:
            return None
        if d.by_text and shape.text != sql:  # computed once per decision, with the decision
            d = rs.decide(analyze(sql), session)
            if d is PASS:
                return None
        return d

    def log_execution(self, session: Session, d: Decision, info: StatementInfo, text: str | None = None) -> None:
        """The log action: one execution under decision d, which a matching rule logs (the relay counts
        executions itself, with d.tally; text: the statement as sent, when at hand)."""
        extra = {"rules": [m[0] for m in d.matched], "fingerprint": info.fingerprint, "user": session.user,
                 "database": session.database, "query": info.normalized}
        if self.app.cfg.server.log_parameters:
            extra["text"] = text or info.text  # the statement with its literal values: only when asked for
        log.info("statement", extra=extra)

    def describe(self) -> list[dict]:
        return self.holder.current.describe()

    def reload(self) -> tuple[bool, str]:
        return self.holder.reload()
