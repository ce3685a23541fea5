"""The durable feedback log: decisions (served answers) and human feedback, in one ordered sequence.

    log = open_feedback_log(".loopserve/feedback.sqlite")      # or "postgresql://user@host/db"
    log.append_decisions([decision])                            # usually via DecisionWriter
    results = log.append_feedback(events, {"sentiment": ["great", "other"]})
    for rec in log.follow(after_seq=cursor, stop=stop):         # the trainer
        ...

See DESIGN.md, "Feedback log". The gRPC servicer converts protos to `Feedback`, calls a
`GroupCommitter` (`FeedbackCommitter` in process, or `commit_process.ProcessCommitter`) and converts
each `FeedbackResult` back.
"""

from __future__ import annotations

from loopserve.feedback_log.base import FeedbackLog, ImportResult, LabelSets, LogStats
from loopserve.feedback_log.records import Decision, Feedback, FeedbackResult, LogRecord
from loopserve.feedback_log.validation import (
    check_feedback_references,
    check_feedback_shape,
    validate_decision,
    validate_feedback,
)
from loopserve.feedback_log.writer import DecisionWriter, FeedbackCommitter, GroupCommitter

_POSTGRES_SCHEMES = ("postgresql://", "postgres://")
_SQLITE_SCHEME = "sqlite://"


def open_feedback_log(url: str) -> FeedbackLog:
    """Open (creating if needed) the log at `url`.

    ``postgresql://...`` (or ``postgres://``) selects PostgreSQL; anything else is a SQLite file path,
    optionally written ``sqlite:///abs/path`` or ``sqlite://rel/path``.
    """
    if url.startswith(_POSTGRES_SCHEMES):
        from loopserve.feedback_log.postgres import PostgresFeedbackLog  # psycopg only when needed

        return PostgresFeedbackLog(url)
    from loopserve.feedback_log.sqlite import SqliteFeedbackLog

    path = url.removeprefix(_SQLITE_SCHEME)
    if path in ("", ":memory:"):
        raise ValueError("the feedback log needs a file path (it must survive the process)")
    return SqliteFeedbackLog(path)


__all__ = [
    "Decision",
    "DecisionWriter",
    "Feedback",
    "FeedbackCommitter",
    "FeedbackLog",
    "FeedbackResult",
    "GroupCommitter",
    "ImportResult",
    "LabelSets",
    "LogRecord",
    "LogStats",
    "check_feedback_references",
    "check_feedback_shape",
    "open_feedback_log",
    "validate_decision",
    "validate_feedback",
]
