"""ReDial's original release (`conversations.json` as a JSON array, or `train_data.jsonl` as JSON lines) as
whole dialogues to inject into a CRS task (`task.knowledge_source=redial_conversations`)."""
from __future__ import annotations

import re
from pathlib import Path

from core.io import FirstSeen, read_records, text_field
from core.types import DataError
from metrics import ranking
from tasks.crs_turns import Dialogue

REDIAL_FORMAT = (
    'ReDial conversations: a JSON array (conversations.json) or JSON lines (train_data.jsonl) of objects with '
    '"messages" [{"text", "senderWorkerId"}], "initiatorWorkerId", "movieMentions" {id: "Title (Year)"}'
)
_REDIAL_MENTION = re.compile(r"@(\d+)")


def _redial_text(text: str, mentions: dict[str, str]) -> str:
    return _REDIAL_MENTION.sub(lambda m: mentions.get(m.group(1), m.group(0)), text)


def load_redial_conversations(path: str | Path, dropped: dict[str, int] | None = None) -> list[Dialogue]:
    """Dialogues of ReDial's original release. The seeker (initiator) is "User", the recommender
    "System"; consecutive messages of one speaker are joined; "@id" mentions become titles. Every
    recommender utterance that mentions a movie is a recommendation of those titles (years removed).
    A message text must be a string (file:line otherwise); a conversation with no text is dropped and
    counted in `dropped["empty_conversation"]`; a `conversationId` seen twice is refused naming both."""
    dropped = dropped if dropped is not None else {}
    dropped.setdefault("empty_conversation", 0)
    ids = FirstSeen("conversationId")
    dialogues = []
    for where, conversation in read_records(path, ("messages", "initiatorWorkerId"), REDIAL_FORMAT):
        mentions = conversation.get("movieMentions") or {}
        if not isinstance(mentions, dict):
            raise DataError(f"{where}: 'movieMentions' must be an object {{id: title}}. Expected {REDIAL_FORMAT}.")
        if not isinstance(conversation["messages"], list):
            raise DataError(f"{where}: 'messages' must be a list. Expected {REDIAL_FORMAT}.")
        utterances: list[tuple[str, str, list[str]]] = []  # (speaker, text, mentioned ids)
        for message in conversation["messages"]:
            if not isinstance(message, dict) or "text" not in message or "senderWorkerId" not in message:
                raise DataError(f"{where}: every message needs 'text' and 'senderWorkerId'. Expected {REDIAL_FORMAT}.")
            raw = text_field(message, "text", where, REDIAL_FORMAT)
            speaker = "User" if message["senderWorkerId"] == conversation["initiatorWorkerId"] else "System"
            text = _redial_text(raw.strip(), mentions)
            if not text:
                continue  # an empty message adds nothing, and must not start an empty turn
            message_ids = _REDIAL_MENTION.findall(raw)
            if utterances and utterances[-1][0] == speaker:
                previous = utterances[-1]
                utterances[-1] = (speaker, f"{previous[1]} {text}".strip(), previous[2] + message_ids)
            else:
                utterances.append((speaker, text, message_ids))
        dialog_id = str(conversation.get("conversationId", len(dialogues)))
        ids.add(dialog_id, where)
        if not utterances:
            dropped["empty_conversation"] += 1
            continue
        recommendations = []
        for index, (speaker, text, mentioned) in enumerate(utterances):
            titles = tuple(dict.fromkeys(
                ranking.collapse_spaces(ranking.strip_parentheses(str(mentions[i]))) for i in mentioned if i in mentions
            ))
            if speaker == "System" and titles:
                before = [u[1] for u in utterances[:index] if u[0] == "User"]
                recommendations.append((before[-1] if before else "", titles, text))
        text = "\n".join(f"{speaker}: {text}" for speaker, text, _ in utterances)
        dialogues.append(Dialogue(f"redial-{dialog_id}", text, tuple(recommendations)))
    if not dialogues:
        why = f" ({dropped['empty_conversation']} without text dropped)" if dropped["empty_conversation"] else ""
        raise DataError(f"{path}: no conversation with messages{why}. Expected {REDIAL_FORMAT}.")
    return dialogues
