"""The site's half of user-level (central) differential privacy: clip the round's update before it leaves.

With the client-side wrappers of :mod:`server.central_dp` the server never sees an unclipped update: the
train config says which of Flower's clipping mods applies (``CENTRAL_CLIPPING``: ``"fixed"`` or
``"adaptive"``) next to Flower's own ``clipping_norm``. One mod, :func:`central_clipping_mod`, is registered
for every run, so the same ClientApp serves runs with and without central DP, and the server decides:
``client_app.train(mods=[central_clipping_mod])``. With other mods that change the reply's arrays, list it
first: Flower wraps ``mods[0]`` outermost, so it sees the reply last and what leaves the site is clipped.

Flower's mods need exactly one ArrayRecord and one ConfigRecord in the train message (ours: ``ARRAYS`` and
``CONFIG``) and a reply with one ArrayRecord holding the same keys in the same order; the adaptive mod adds
``norm_bit`` (1 when the update was clipped) to the reply's one MetricRecord.
"""

from __future__ import annotations

from flwr.app import Context, Error, Message, MessageType
from flwr.clientapp.mod import adaptiveclipping_mod, fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.common.constant import ErrorCode

CENTRAL_CLIPPING = "central-clipping"
"""Train-config key: which clipping the site applies to its update (absent: none, no central DP)."""
FIXED, ADAPTIVE = "fixed", "adaptive"

CLIPPING_MODS: dict[str, Mod] = {FIXED: fixedclipping_mod, ADAPTIVE: adaptiveclipping_mod}


def requested_clipping(msg: Message) -> object | None:
    """The ``CENTRAL_CLIPPING`` value of the message's config (None when no config record carries it)."""
    for record in msg.content.config_records.values():
        if CENTRAL_CLIPPING in record:
            return record[CENTRAL_CLIPPING]
    return None


def central_clipping_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower's ``fixedclipping_mod`` / ``adaptiveclipping_mod`` when the train config asks; else pass through.

    An unknown ``CENTRAL_CLIPPING`` value is answered with an error reply rather than an unclipped update: the
    server's privacy accounting assumes clipping happened.
    """
    if msg.metadata.message_type != MessageType.TRAIN:
        return call_next(msg, context)
    mode = requested_clipping(msg)
    if mode is None:
        return call_next(msg, context)
    mod = CLIPPING_MODS.get(mode) if isinstance(mode, str) else None
    if mod is None:
        reason = (
            f"train config {CENTRAL_CLIPPING}={mode!r} is not one of {', '.join(map(repr, CLIPPING_MODS))}: "
            "the server and this ClientApp disagree on central DP (update both to the same fedmer version)"
        )
        return Message(Error(code=ErrorCode.MOD_FAILED_PRECONDITION, reason=reason), reply_to=msg)
    replies: list[Message] = []

    def train_and_keep(message: Message, node: Context) -> Message:
        replies.append(call_next(message, node))
        return replies[-1]

    clipped = mod(msg, context, train_and_keep)
    if replies and not replies[0].has_error() and not replies[0].content.array_records:
        return replies[0]  # a site that did not train (its sample-level DP budget is spent) has no update to clip
    return clipped
