"""VIoTGPT / VIoT-Tool (zhongyy/VIoTGPT = MICLAB-BUPT/VIoTGPT).

Training conversations: ``{conversations: [{from: Human | AI, value}]}`` (train/train.py ``preprocess``,
FastChat ``tool_llama`` template in train/tool_conversation.py); an AI value in ReAct form
(VIoTGPT_Vision_nodemo.py FORMAT_INSTRUCTIONS: ``Thought: Do I need to use a tool? Yes.`` ...
``Thought: Do I need to use a tool? No.\\nAI: Final Answer: ...``) becomes assistant/tool turns.

Test files (VIoT_tool/test_*.json), three schemas:
  A ``{id: <query text>, chains: <ReAct string>, result}`` (action, anomaly, crowd, fire, licenceplate);
  B ``{query, img_path, action, action_input}`` (face, personreid, vehiclereid: an uploaded image);
  C JSONL ``{prompt, query, chains: [{thought, action, action_input, observation}], answer, video_path}``
    (gait: an uploaded video).
They become evaluation records whose ``eval.reference`` is the canonical call chain. Tool names are
normalised to the tool names the VIoTGPT code registers (:data:`VIOT_TOOLS`) with :data:`ALIASES`; the
source spelling stays in ``meta.react.names`` so the source text is reproduced exactly.
"""

from __future__ import annotations

import copy

from toollmm.core.tokens import PLACEHOLDER

from ...core.react import DEFAULT_CALL_THOUGHT, ReactStyle, concat_styles, text_to_messages
from .base import (
    Context,
    check_media,
    leftovers,
    make_record,
    need,
    record_id,
    register,
    tool_call,
    tool_spec,
)

#: name -> description, as registered by @prompts in VIoTGPT_Vision_nodemo.py (the 11 tools its test
#: scripts load: FaceRecognition, PlateRecognition, PersonReid, GaitRecognition, VehicleReid, FSDetect,
#: CrowdCounting, HumanAction, HumanPose, SceneRecognition, AnomalyDetection)
VIOT_TOOLS: dict[str, str] = {
    "Recognize the Face": "useful when you want to know whether the faces in the photo appeared in the video. The tool recognize people by face. The input to this tool should be a comma separated string of two, representing the image_path and the video_path. ",
    "Recognize the Vehicle by Plate Number": "useful when you want to know whether the vehicle of given vehicle plate appeared in the video. The tool recognize the vehicle by the plate number.The input to this tool should be a comma separated string of two, representing the vehicle plate and the video_path.",
    "Recognize the Person by Appearance": "useful when you want to know whether the person in the photo appeared in the video. The tool recognize people by appearance, that is body shape and clothing. The input to this tool should be a comma separated string of two, representing the image_path and the video_path.",
    "Recognize the Person by Gait": "useful when you want to know whether the person in the uploaded video appeared in the video. The tool recognize people by gait, that is the way people walks or runs. The input to this tool should be a comma separated string of two, representing the uploaded video_path and the target video_path. ",
    "Recognize the Vehicle by Appearance": "useful when you want to know whether the vehicle in the photo appeared in the video.The tool recognize the vehicle by appearance.The input to this tool should be a comma separated string of two, representing the image_path and the video_path.",
    "Fire and Smoke Detection": "useful when you want to know whether there is fire or smoke in the video, receives video_path as input. The input to this tool should be a string, representing the video_path.",
    "Count People in the Video": "useful when you want to counting the total crowd present in the video, receives video_path as input. The input to this tool should be a string, representing the video_path.",
    "Recognize the Human Action Condition on Pose": "useful when you want to know the action of human inside the video. The input to this tool should be a string representing the path of the pose detection result. Therefore, before using this tool, firstly you need to Detect the Human Pose.",
    "Detect the Human Pose": "useful when you want to know the pose of human inside the video. The input to this tool should be a string, representing the video_path.",
    "Recognize the Scene in the Video": "useful when you want to determine the general semantic class of the scene in the video. The input to this tool should be a string, representing the video_path. ",
    "Detect Anomaly Condition on Video Scene": "useful when you want to know whether there are anomalies that endanger public security in the video. The input to this tool should be a comma separated string of two, representing the scene class and the video_path. ",
}

#: spellings used in the VIoT-Tool test files -> registered tool name (file that uses it)
ALIASES: dict[str, str] = {
    "Crowd Counting": "Count People in the Video",  # test_crowd.json
    "Recognize the Action Condition on Pose": "Recognize the Human Action Condition on Pose",  # test_action.json
    "Re-Identify the Person in the Video": "Recognize the Person by Appearance",  # test_personreid.json
    # "Recognize the Vehicle Plate": see normalize_tool (test_licenceplate.json vs test_vehiclereid.json)
}
VEHICLE_PLATE_ALIAS = "Recognize the Vehicle Plate"
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")


def normalize_tool(name: str, raw_input: str = "") -> str:
    """Registered VIoTGPT tool name for a test-file spelling. ``Recognize the Vehicle Plate`` means plate
    recognition when its first argument is a plate (test_licenceplate.json) and vehicle re-identification
    when it is an uploaded image (test_vehiclereid.json)."""
    if name == VEHICLE_PLATE_ALIAS:
        first = raw_input.split(",", 1)[0].strip()
        image = first.startswith("{query_upload") or first.lower().endswith(_IMAGE_SUFFIXES)
        return "Recognize the Vehicle by Appearance" if image else "Recognize the Vehicle by Plate Number"
    return ALIASES.get(name, name)


def viot_tools() -> list[dict]:
    return [tool_spec(n, d) for n, d in VIOT_TOOLS.items()]


def _react(text: str, ctx: Context, where: str) -> tuple[list[dict], ReactStyle]:
    try:
        return text_to_messages(text, names=normalize_tool, where=where)
    except ValueError as e:
        raise ctx.fail(str(e)) from e


def _record(
    rid: str, ctx: Context, msgs: list[dict], style: ReactStyle | None, raw: dict, used: set, **extra
) -> dict:
    calls = [copy.deepcopy(m["tool_calls"][0]["function"]) for m in msgs if m.get("tool_calls")]
    meta = {"prompt": "viotgpt", **leftovers(raw, used)}
    if style is not None and style.to_meta():
        meta["react"] = style.to_meta()
    evaluation = extra.pop("eval", None)
    if evaluation is not None:
        evaluation = {"reference": calls, **evaluation}
    return make_record(rid, ctx, msgs, tools=viot_tools(), eval=evaluation, meta=meta, **extra)


def _test_chain_string(raw: dict, ctx: Context) -> dict:
    query, chains = need(raw, "id", ctx), need(raw, "chains", ctx)
    steps, style = _react(chains, ctx, "chains")
    evaluation = {"acceptable": [raw["result"]]} if raw.get("result") else {}
    msgs = [{"role": "user", "content": query}, *steps]
    return _record(
        f"{ctx.stem}-{ctx.index}", ctx, msgs, style, raw, {"id", "chains", "result"}, eval=evaluation
    )


def _upload(modality: str, path: str, query: str, ctx: Context) -> tuple[dict, dict]:
    check_media(path, ctx)
    return {"role": "user", "content": PLACEHOLDER[modality] + "\n" + query}, {modality + "s": [path]}


def _test_upload_image(raw: dict, ctx: Context) -> dict:
    action, action_input = need(raw, "action", ctx), need(raw, "action_input", ctx)
    user, media = _upload("image", need(raw, "img_path", ctx), need(raw, "query", ctx), ctx)
    name = normalize_tool(action, action_input)
    msgs = [
        user,
        {"role": "assistant", "content": "", "tool_calls": [tool_call(name, {"input": action_input})]},
    ]
    style = ReactStyle(names={name: action} if name != action else {})
    used = {"query", "img_path", "action", "action_input"}
    return _record(f"{ctx.stem}-{ctx.index}", ctx, msgs, style, raw, used, eval={}, **media)


def _test_step_list(raw: dict, ctx: Context) -> dict:
    user, media = _upload("video", need(raw, "video_path", ctx), need(raw, "query", ctx), ctx)
    msgs = [{"role": "system", "content": raw["prompt"]}] if raw.get("prompt") else []
    msgs.append(user)
    names: dict[str, str] = {}
    for k, step in enumerate(need(raw, "chains", ctx, list)):
        if not isinstance(step, dict) or not {"action", "action_input"} <= set(step):
            raise ctx.fail(f"chains[{k}]: expected {{thought, action, action_input, observation}}")
        name = normalize_tool(step["action"], step["action_input"])
        if name != step["action"]:
            names[name] = step["action"]
        call = {
            "role": "assistant",
            "content": "",
            "tool_calls": [tool_call(name, {"input": step["action_input"]})],
        }
        if step.get("thought", DEFAULT_CALL_THOUGHT) != DEFAULT_CALL_THOUGHT:
            call["thought"] = step["thought"]
        msgs += [call, {"role": "tool", "name": name, "content": step.get("observation", "")}]
    evaluation = {}
    if raw.get("answer"):
        msgs.append({"role": "assistant", "content": raw["answer"]})
        evaluation["acceptable"] = [raw["answer"]]
    used = {"prompt", "query", "chains", "answer", "video_path"}
    return _record(
        f"{ctx.stem}-{ctx.index}", ctx, msgs, ReactStyle(names=names), raw, used, eval=evaluation, **media
    )


def _training(raw: dict, ctx: Context) -> dict:
    msgs: list[dict] = []
    styles: list[ReactStyle] = []
    for k, turn in enumerate(need(raw, "conversations", ctx, list)):
        speaker, value = (turn.get("from"), turn.get("value")) if isinstance(turn, dict) else (None, None)
        if speaker not in ("Human", "AI") or not isinstance(value, str):
            raise ctx.fail(
                f"conversations[{k}]: expected from Human/AI with a string value (DPO 'AI_reject' is not supported)"
            )
        if speaker == "Human":
            msgs.append({"role": "user", "content": value})
        elif value.startswith("Thought:"):
            steps, style = _react(value, ctx, f"conversations[{k}]")
            msgs += steps
            styles.append(style)
        else:
            msgs.append({"role": "assistant", "content": value})
    record = _record(record_id(raw, ctx), ctx, msgs, None, raw, {"id", "conversations"})
    if len(styles) == 1 and styles[0].to_meta():
        record.setdefault("meta", {})["react"] = styles[0].to_meta()
    elif len(styles) > 1:
        record.setdefault("meta", {})["react_turns"] = [s.to_meta() for s in styles]
        record["meta"]["react"] = concat_styles(*styles).to_meta()
    return record


@register("viot")
def convert_viot(raw: dict, ctx: Context) -> list[dict]:
    """VIoT-Tool training conversations and the three test-file schemas."""
    if not isinstance(raw, dict):
        raise ctx.fail(f"expected a JSON object, got {type(raw).__name__}")
    if "conversations" in raw:
        return [_training(raw, ctx)]
    if isinstance(raw.get("chains"), str):
        return [_test_chain_string(raw, ctx)]
    if "img_path" in raw:
        return [_test_upload_image(raw, ctx)]
    if isinstance(raw.get("chains"), list):
        return [_test_step_list(raw, ctx)]
    raise ctx.fail("not a VIoT record: expected 'conversations', 'chains' or 'img_path'")
