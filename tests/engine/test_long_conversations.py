"""Long support conversations: 60 turns in English and in Chinese, with memory under pressure.

Each script is a refund journey that drifts: small talk ("how's your day", "天气真好"),
questions about shipping, invoices and loyalty points, one correction of the order
number half-way through ("sorry, it's HL26110842" / "不好意思，订单号是HL26110842"),
more questions, and the final "yes, go ahead". They run through the real engine and
the demo shop with

* Claude, played by :class:`StandInClaude` behind the fake Messages API (real SDK, real
  HTTP): it answers ``record_decision`` from what the request shows (order numbers from
  the latest customer text, reasons from keywords, the pinned echo from the system
  prompt's "Known facts", once deliberately wrong), ``choose_flow`` and the summary
  prompt; the fake validates every request like the real API (tool-use pairing, role
  alternation), so a split tool-use pair would come back as a 400;
* the offline model.

Checked at every turn: the request stays under the flow's budget (a flow copy with
``max_context_tokens: 3000``), the current question is never trimmed away, no request is
rejected. At the end: the pinned entities in the last request are the corrected ones,
the entity history shows the correction with provenance, summaries ran off the reply
path (a slow summary call never delays a reply, a 529 on it falls back to the extractive
summary and is counted), and the Chinese conversation stays in Chinese.

The scripts and the stand-in are also used by ``bench/memory.py``.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from ruamel.yaml import YAML

from engine.actions import ActionRegistry
from engine.core.types import Inbound
from engine.demo.actions import build_actions
from engine.demo.shop import ORDER_OTHER, ORDER_SMALL, Shop
from engine.flow.compiled import FlowSet
from engine.flow.loader import load_flows
from engine.memory import budget_tokens, estimate_request_tokens
from engine.metrics import Metrics
from engine.models.base import Decision, DecisionRequest, Model
from engine.models.claude import ClaudeModel
from engine.models.offline import OfflineModel
from engine.runner import Engine, TurnResult
from engine.store.base import ConversationKey, ConversationState, MessageRecord
from engine.store.memory import MemoryStore
from tests.fakes.claude_api import (
    FakeClaude,
    MessageReply,
    RecordedRequest,
    ResponderResult,
    count_request_tokens,
)

ROOT = Path(__file__).resolve().parents[2]
CUSTOMER = "demo:long"
#: The order number the customer gives first (their kettle order) ...
OLD_ORDER = ORDER_OTHER
#: ... and the one they correct it to (the earbuds they want refunded).
NEW_ORDER = ORDER_SMALL
#: Turn (1-based) of the correction in both scripts.
CORRECTION_TURN = 30
#: The small budget of the flow copies the long tests use.
SMALL_BUDGET = 3000

# --- the scripts ---------------------------------------------------------------------------------
# Digressions avoid the words the offline model reads as confirm/deny at the read-back
# ("ok", "right", "sure", "no", "not"; 是/对/行/不/嗯, 好+的, 可+以), so both models
# see the same journey; Claude is told the same by the stand-in's rules below.

EN_SCRIPT: tuple[str, ...] = (
    # 1-6: the request, small talk, a question, the (wrong) order number, the reason
    "Hi there! I'd like to get a refund for the Aurora X2 wireless earbuds I ordered from your "
    "shop a little while ago, please.",
    "Before we start, how's your day going? I imagine it's busy with all the holiday shopping "
    "going on at the moment?",
    "Quick question first: do I need to send the earbuds back in the original box, or is any "
    "padded envelope fine?",
    f"The order number is {OLD_ORDER}, it was delivered to my office last week together with a "
    "couple of other parcels.",
    "Haha, thanks for being so patient with me, I've been on hold with three other companies "
    "this morning.",
    "So the problem is that the left earbud arrived cracked, there's a visible split along the "
    "charging contacts.",
    # 7-29: questions and small talk while the bot waits for a yes
    "Hmm, before I answer that, how long does the money usually take to come back to a credit "
    "card?",
    "By the way, the weather here is lovely today, first sunny weekend in ages, I might take a "
    "long walk later.",
    "Do you ship to Hong Kong as well? My sister lives there and she's been asking about your "
    "kettles.",
    "Also, is there a way to get the invoice for this order sent to a different email address "
    "than my usual one?",
    "Random thought: what's your favourite thing about working in customer support, if you're "
    "allowed to say?",
    "What happens with the earbuds after I send them back, do you recycle them or repair and "
    "resell them?",
    "Are your shops open on public holidays? There's one near my place and I might just drop by "
    "instead.",
    "I'm also curious whether the Aurora X3 is coming out soon, a friend said there's a new model "
    "in the works?",
    "Lol sorry for all the questions, I'm working from home today and honestly a little bored.",
    "How do I check my loyalty points balance? I think I should have quite a few by this point "
    "with all my orders.",
    "Is the Kettle Pro dishwasher safe, by the way? The manual isn't very clear about the lid.",
    "Do you have any discount codes for students? My nephew starts university next month and "
    "needs headphones.",
    "What's the warranty on the earbuds normally? Just so I know for the replacement pair I'm "
    "planning to buy.",
    "Hello again, sorry, my cat walked across the keyboard and I forgot what I was "
    "about to ask.",
    "Can I pay with Alipay for the next order, or only with credit cards and bank transfer?",
    "How long does shipping to Shenzhen usually take? I'll probably order a new pair this "
    "weekend.",
    "Is there a phone number I can call if I have more questions later on, or is this chat the "
    "best way?",
    "By the way, do you sell replacement ear tips for the Aurora X2? Mine are a bit worn.",
    "What's the best way to clean the charging case, is a little isopropyl alcohol fine?",
    "Sorry, one more: does the refund include the shipping fee I paid, or only the price of the "
    "item?",
    "Haha I promise I'm almost done, cheers for bearing with me this afternoon.",
    "Do you know if the refund shows up as a separate line on my statement or gets netted "
    "against purchases?",
    "Hmm wait, which product does that order number belong to? I'm checking my confirmation "
    "emails.",
    # 30: the correction
    f"Sorry, it's {NEW_ORDER} - the number I gave you earlier is my kettle order, the earbuds "
    "came on a separate one.",
    # 31-59: more questions and small talk
    "Great, 129 is much more like what I paid for the earbuds. How do I print the return label?",
    "Will the courier pick the parcel up from my home, or do I need to take it to a drop-off "
    "point?",
    "How's the weather where you are? It's getting chilly here in the evenings.",
    "Can the refund be paid to a different card? The card I used expired last month.",
    "What time does your support chat close in the evening, in case I think of something else "
    "later?",
    "Do you offer gift wrapping? My mum's birthday is coming up and I want to send her a kettle.",
    "Is the Kettle Pro available in white? The grey one in my kitchen is fine but white would "
    "match better.",
    "By the way, cheers for catching the order number mix-up so quickly, I'm hopeless with these "
    "numbers.",
    "How many days do I have to post the earbuds back once the refund is approved?",
    "Is there anything I should write on the parcel, like the order number or a reference code?",
    "What's your return address, just so I can double-check it against the label later?",
    "Happy Friday, by the way! Any fun plans for the weekend on your side?",
    "Do you also sell the Aurora X2 in a bundle with the wireless charging pad?",
    "If I order the new earbuds today, would they arrive before next Wednesday?",
    "Can I track the return parcel somewhere on your website once it's sent?",
    "Out of curiosity, do you get a lot of cases like mine, or was I just unlucky?",
    "Is your loyalty programme the same in the app and on the website?",
    "Haha my cat is sitting on my lap demanding attention, sorry if I type slowly.",
    "Do you have a size guide for the ear tips? The medium ones feel slightly loose.",
    "What's the difference between standard and express shipping for small items like earbuds?",
    "Will I get an email confirmation once the refund is processed?",
    "How's your afternoon going, by the way? Hope the other customers are being nice to you.",
    "Are there any extra fees for returning items bought during a sale?",
    "Can I leave a review for the kettle somewhere? It has been really great so far.",
    "By the way, is it possible to change the email address on my account through this chat?",
    "Do you know whether the refund will show in my banking app straight away or only after a "
    "few days?",
    "Haha, cheers again for all the help this afternoon, you've been really patient with me.",
    "One last thing: can I reuse the original box for the return, or should I use a new one?",
    "Lovely, cheers, I think I have everything I wanted to know, haha.",
    # 60: the answer to the read-back
    "Yes, please go ahead with the refund for the earbuds.",
)

ZH_SCRIPT: tuple[str, ...] = (
    # 1-6
    "你好，我上周在你们店里买了一副 Aurora X2 无线耳机，想申请退款，麻烦帮我看一下。",
    "先闲聊一句，今天天气真好，你们那边也出太阳了吗？",
    "请问退货的时候需要用原来的包装盒吗？我把盒子压扁扔掉了。",
    f"订单号是{OLD_ORDER}，上周送到我公司的，和另外几个包裹一起到的。",
    "哈哈，谢谢你这么耐心，我今天上午已经跟好几家客服聊过了。",
    "问题是左边那只耳机收到的时候外壳就裂了，充电触点旁边有一条明显的裂缝。",
    # 7-29
    "先等一下，退款一般多久能到信用卡上呢？",
    "顺便说一句，天气真好，阳光特别足，我打算下午出去散散步。",
    "你们也发货到香港吗？我姐姐住在那边，一直想买你们家电热水壶。",
    "另外，这个订单发票能发到另一个邮箱吗？",
    "随便问问，你平时做客服最喜欢这份工作哪一点？",
    "我寄回去以后，耳机会怎么处理？回收或者维修后再卖？",
    "你们门店节假日营业吗？我家附近有一家，我也许直接过去。",
    "听朋友说 Aurora X3 快出了，真有这回事吗？",
    "哈哈，我话有点多，今天在家办公，有点无聊。",
    "我怎么查看会员积分余额？买了这么多次，应该攒了很多吧？",
    "顺便问下，Kettle Pro 能放进洗碗机洗吗？说明书上写得有点模糊。",
    "你们有学生优惠码吗？我侄子下个月上大学，需要一副耳机。",
    "耳机一般保修多久？我打算再买一副新耳机。",
    "下午好！刚才猫咪从键盘上踩过去，我都忘了要问什么了，哈哈。",
    "下一单能用支付宝付款吗？或者只能刷信用卡？",
    "发货到深圳一般要几天？我打算这个周末再下单一副新耳机。",
    "以后还想咨询的话，有电话能打吗？或者在这里聊最方便？",
    "顺便问下，你们卖 Aurora X2 替换耳塞套吗？我那副已经有点旧了。",
    "清洁充电盒用什么方法最合适？能用一点酒精擦吗？",
    "再问一个：退款包含我付过运费吗？或者只退商品价格？",
    "哈哈，我保证快问完了，谢谢你今天下午这么耐心。",
    "退款在账单上会单独显示一笔，或者和消费抵扣在一起？",
    "等一下，这个订单号下面买了什么商品？我正在翻订单邮件。",
    # 30
    f"不好意思，订单号是{NEW_ORDER}，之前发给你的那个是电热水壶的订单，耳机是另一单。",
    # 31-59
    "太棒了，129元才像我买耳机时付过钱。退货面单怎么打印？",
    "快递员会上门取件吗？或者我需要自己送到快递点？",
    "你那边天气怎么样？我们这里晚上已经有点冷了。",
    "退款能退到另一张卡上吗？我当时付款那张卡上个月过期了。",
    "你们在线客服晚上几点下班？万一我之后又想起什么事情。",
    "你们提供礼品包装吗？我妈妈快过生日了，我想送她一个电热水壶。",
    "Kettle Pro 有白色款吗？厨房里那个灰色也凑合，白色会更搭。",
    "顺便谢谢你这么快发现订单号弄混了，我记数字一向很差。",
    "退款批准以后，我有几天时间把耳机寄回去？",
    "包裹上需要写什么吗？比如订单号或者参考编号？",
    "你们退货地址在哪里？我想之后和面单比一下。",
    "周五快乐！你周末有什么安排吗？",
    "Aurora X2 有和无线充电板一起卖套装吗？",
    "如果我今天订新耳机，下周三之前能到吗？",
    "退货包裹寄出以后，能在网站上查物流吗？",
    "随便问问，你们经常遇到这种情况吗？或者只有我运气差？",
    "App 和网站上会员计划一样吗？",
    "哈哈，我家猫现在趴在我腿上要人陪，打字慢了请见谅。",
    "耳塞套有尺码表吗？中号戴着有点松。",
    "像耳机这种小件，标准快递和加急快递有什么区别？",
    "退款处理完以后会收到邮件通知吗？",
    "顺便问一句，你下午过得怎么样？希望其他顾客都很友善。",
    "促销期间买东西退货会收额外费用吗？",
    "我能在哪里给电热水壶写评价？到目前为止真心很满意。",
    "顺便问下，能在这个聊天里修改账户邮箱吗？",
    "退款会马上到账吗？或者需要过几天？",
    "再次谢谢你今天下午帮忙，你真有耐心。",
    "最后一件事：退货能用原来那个盒子吗？或者需要换新盒子？",
    "谢谢你耐心回答这么多，我想问都问完了。",
    # 60
    "好的，确认退款，请帮我把耳机这一单退了吧。",
)

SCRIPTS = {"en": EN_SCRIPT, "zh": ZH_SCRIPT}


# --- a stand-in for Claude -----------------------------------------------------------------------

DECISION = "record_decision"
ROUTE = "choose_flow"
_ORDER = re.compile(r"HL\d{8}", re.IGNORECASE)
_CJK = re.compile(r"[\u3400-\u9fff]")
_REASONS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("damaged", re.compile(r"\b(?:cracked|broken|damaged|smashed)\b|裂|碎|破损|摔坏")),
    ("not_received", re.compile(r"\bnever (?:arrived|received)\b|没收到")),
    ("defective", re.compile(r"\b(?:stopped working|faulty)\b|质量问题")),
)
_CONFIRM = re.compile(r"^\s*(?:yes|yep)\b.*\b(?:go ahead|refund)|确认退款", re.IGNORECASE)
_DENY = re.compile(r"\b(?:cancel the refund|don't refund)\b|取消退款", re.IGNORECASE)
_FACTS_HEADER = "Known facts"
_FACT_LINE = re.compile(r"^- (\w+) = (.*)$")
_LANGUAGE = re.compile(r"Reply in the customer's language \((\w+)\)")
_SUMMARY_LANGUAGE = re.compile(r"bullet points in (\w+)")

_ANSWERS = {
    "en": (
        "That's a fair question. Refunds go back to the original payment method, and shipping "
        "questions are answered in our help centre under Delivery and Returns.",
        "Happy to chat! Most of our customers ask about this too; the short answer is that it "
        "depends on the item and the delivery address, and the help centre has the details.",
        "Good to hear from you. I can't promise anything beyond what the system confirms, but "
        "our help centre lists the current options, fees and timings for this.",
        "Thanks for asking. Our colleagues update the help centre every week, so the delivery, "
        "payment and loyalty pages there are the most reliable place to check.",
    ),
    "zh": (
        "这个问题问得很实在。退款会原路退回，配送相关的问题可以在帮助中心的“配送与退货”页面查看。",
        "很高兴和您聊天！很多顾客也问过这个，简单来说要看具体商品和收货地址，帮助中心里有详细说明。",
        "收到您的消息。系统确认之外的事情我没法承诺，不过帮助中心列出了目前的选项、费用和时效。",
        "谢谢您的提问。同事们每周都会更新帮助中心，配送、支付和会员积分页面的信息最可靠。",
    ),
}
_CLOSING = {
    "en": " Your refund request for order {order} stays open until you confirm it; just let me "
          "know when you're ready.",
    "zh": " 订单 {order} 的退款申请会一直保留，等您确认后再提交，准备好了告诉我就行。",
}


def known_facts(system_text: str) -> dict[str, str | None]:
    """The pinned facts a decision prompt shows ("Known facts" section), by name."""
    facts: dict[str, str | None] = {}
    _, found, tail = system_text.partition(_FACTS_HEADER)
    if not found:
        return facts
    for line in tail.splitlines()[1:]:
        match = _FACT_LINE.match(line.strip())
        if match is None:
            break
        value = match.group(2).strip()
        facts[match.group(1)] = None if value == "(not given yet)" else value
    return facts


def customer_text(request: RecordedRequest) -> str:
    """The customer's latest message: the text blocks of the last user message."""
    for message in reversed(request.messages):
        if message.get("role") != "user":
            continue
        content = message.get("content")
        if isinstance(content, str):
            return content
        return "\n".join(str(b.get("text", "")) for b in content or []
                         if isinstance(b, dict) and b.get("type") == "text")
    return ""


def is_summary(request: RecordedRequest) -> bool:
    return not request.tool_names and "running summary" in request.system_text


def is_decision(request: RecordedRequest) -> bool:
    return request.forced_tool == DECISION


@dataclass
class StandInClaude:
    """Answers the engine's Claude calls plausibly, from what each request shows.

    * ``record_decision``: order numbers found in the customer's latest message (the last
      one wins), a refund reason from keywords, ``confirm``/``deny`` only on an explicit
      answer to the read-back, ``off_topic`` for everything else, a two-sentence reply in
      the language the system prompt asks for, and, when the tool requires ``pinned``, the
      "Known facts" of the system prompt, except once: at the first memory check that
      shows ``drift_to`` it echoes ``stale`` instead (a model trusting an old transcript).
    * ``choose_flow``: the refund journey.
    * the summary prompt: a few bullets in the requested language with no entity values
      (as the prompt asks), after ``summary_delay`` seconds.
    """

    drift_to: str | None = None
    stale: str | None = None
    summary_delay: float = 0.0
    #: The decision request whose pinned echo was wrong, once it happened.
    drifted: RecordedRequest | None = None
    summaries: int = 0
    decisions: int = 0

    def install(self, fake: FakeClaude) -> StandInClaude:
        fake.route(is_summary, self.summary)
        fake.route(is_decision, self.decide)
        fake.route(lambda r: r.forced_tool == ROUTE, self.route)
        return self

    def route(self, request: RecordedRequest) -> ResponderResult:
        return MessageReply.tool_use(ROUTE, {"flow": "refund", "wants_human": False,
                                             "satisfaction": 4})

    def summary(self, request: RecordedRequest) -> ResponderResult:
        self.summaries += 1
        match = _SUMMARY_LANGUAGE.search(request.system_text)
        zh = match is not None and match.group(1) == "zh"
        folded = request.last_user_text.count("\ncustomer: ")
        if zh:
            text = ("- 顾客想为收到时破损的无线耳机退款。\n"
                    "- 期间聊了天气和日常，问了配送、发票、会员积分等问题"
                    f"（本段 {folded} 条顾客消息）。\n"
                    "- 机器人已复述退款内容，正在等顾客确认。\n- 顾客情绪：友好、耐心。")
        else:
            text = ("- The customer wants a refund for wireless earbuds that arrived damaged.\n"
                    "- They chatted and asked side questions about shipping, invoices and "
                    f"loyalty points ({folded} customer messages in this part).\n"
                    "- The bot read the refund back and waits for a yes or no.\n"
                    "- Mood: friendly and patient.")
        return MessageReply.text(text, delay=self.summary_delay)

    def decide(self, request: RecordedRequest) -> ResponderResult:
        self.decisions += 1
        tool = request.tool(DECISION) or {}
        schema = tool.get("input_schema", {})
        props = schema.get("properties", {})
        text = customer_text(request)
        facts = known_facts(request.system_text)
        match = _LANGUAGE.search(request.system_text)
        language = "zh" if match and match.group(1) == "zh" else "en"
        allowed = set(props.get("transition", {}).get("enum", [])) - {None}
        entity_names = set(props.get("entities", {}).get("properties", {}))

        entities: dict[str, str] = {}
        orders = _ORDER.findall(text)
        if orders and "order_id" in entity_names:
            entities["order_id"] = orders[-1].upper()
        if "reason" in entity_names:
            for value, pattern in _REASONS:
                if pattern.search(text):
                    entities["reason"] = value
                    break
        transition = None
        if "confirm" in allowed and _CONFIRM.search(text):
            transition = "confirm"
        elif "deny" in allowed and _DENY.search(text):
            transition = "deny"
        off_topic = not entities and transition is None

        order = entities.get("order_id") or facts.get("order_id") or "-"
        answers = _ANSWERS[language]
        reply = answers[len(text) % len(answers)] + _CLOSING[language].format(order=order)
        decision: dict[str, Any] = {
            "reply": reply, "entities": entities, "transition": transition, "satisfaction": 4,
            "wants_human": False, "off_topic": off_topic,
            "language": "zh" if _CJK.search(text) else "en",
        }
        if "pinned" in schema.get("required", []):
            pinned: dict[str, Any] = {name: facts.get(name)
                                      for name in props.get("pinned", {}).get("properties", {})}
            if self.drifted is None and self.drift_to is not None and \
                    pinned.get("order_id") == self.drift_to:
                pinned["order_id"] = self.stale
                self.drifted = request
            decision["pinned"] = pinned
        return MessageReply.tool_use(DECISION, decision)


# --- harness -------------------------------------------------------------------------------------


#: The demo flow hands a conversation that drifts for 3 x max_failed_attempts turns in a row
#: (9) to a colleague; these customers drift for up to 29 turns in a row at the read-back.
PATIENT = {"max_failed_attempts": 10}


def flow_copy(directory: Path, *, handoff: dict[str, Any] | None = None,
              **summary: Any) -> Path:
    """The demo flows copied to ``directory``; the refund flow gets ``summary`` settings
    and ``handoff`` overrides (:data:`PATIENT` by default)."""
    directory.mkdir(parents=True, exist_ok=True)
    for source in (ROOT / "flows").glob("*.yaml"):
        shutil.copy(source, directory / source.name)
    yaml = YAML()
    path = directory / "refund.yaml"
    spec = yaml.load(path.read_text(encoding="utf-8"))
    spec["summary"] = dict(summary)
    spec["handoff"].update(PATIENT if handoff is None else handoff)
    with path.open("w", encoding="utf-8") as out:
        yaml.dump(spec, out)
    return directory


def load_demo_flows(directory: Path, actions: ActionRegistry) -> FlowSet:
    return load_flows(directory, ROOT / "prompts", actions.names())


@dataclass
class Turn:
    """One customer message and what came of it."""

    number: int
    text: str
    result: TurnResult
    seconds: float
    #: Decision requests the fake received during the turn (Claude runs only).
    requests: list[RecordedRequest] = field(default_factory=list)
    #: Summary tasks running when the message arrived, and when the reply was returned.
    summaries_before: int = 0
    summaries_pending: int = 0

    @property
    def replies(self) -> list[str]:
        return [o.text for o in self.result.outbound if o.kind not in ("disclosure", "rating")]


@dataclass
class LongChat:
    """A 60-turn conversation through one engine."""

    engine: Engine
    store: MemoryStore
    key: ConversationKey
    fake: FakeClaude | None = None
    turns: list[Turn] = field(default_factory=list)

    async def say(self, text: str) -> Turn:
        before = len(self.fake.requests) if self.fake is not None else 0
        inbound = Inbound(self.key, text, CUSTOMER, datetime.now(UTC),
                          channel_message_id=f"{self.key.thread}-{len(self.turns) + 1}")
        running = len(self.engine._tasks)
        started = time.perf_counter()
        result = await self.engine.handle(inbound)
        seconds = time.perf_counter() - started
        requests = [r for r in self.fake.requests[before:] if is_decision(r)] \
            if self.fake is not None else []
        turn = Turn(len(self.turns) + 1, text, result, seconds, requests, running,
                    len(self.engine._tasks))
        self.turns.append(turn)
        return turn

    async def talk(self, script: Sequence[str], *, pause: float = 0.0) -> list[Turn]:
        for text in script:
            await self.say(text)
            # The customer types; the event loop runs background work meanwhile (an
            # in-memory turn never suspends, so without this nothing else would run).
            await asyncio.sleep(pause)
        return self.turns

    async def conv(self) -> ConversationState:
        conv = await self.store.load(self.key)
        assert conv is not None
        return conv

    async def events(self, name: str) -> list[MessageRecord]:
        conv = await self.conv()
        return [r for r in await self.store.messages(conv.id)
                if r.direction == "event" and r.text == name]


def make_chat(flows: FlowSet, actions: ActionRegistry, model: Model, *, thread: str,
              fake: FakeClaude | None = None, metrics: Metrics | None = None) -> LongChat:
    store = MemoryStore()
    engine = Engine(flows, store, model, actions, fallback=OfflineModel(), metrics=metrics)
    return LongChat(engine, store, ConversationKey("test", "shop", thread), fake)


def request_tokens(request: RecordedRequest) -> tuple[int, int]:
    """(the fake's count, the engine's estimate) of a decision request's input tokens."""
    body = request.body
    return count_request_tokens(body), estimate_request_tokens(
        body.get("system", []), body.get("messages", []), body.get("tools", []))


def tool_pairs_intact(messages: Sequence[dict[str, Any]]) -> bool:
    """Every tool_result answers a tool_use of the message before it, and every tool_use
    is answered in the message after it (what the Messages API requires)."""
    def blocks(message: dict[str, Any], kind: str) -> list[dict[str, Any]]:
        content = message.get("content")
        return [b for b in content if isinstance(b, dict) and b.get("type") == kind] \
            if isinstance(content, list) else []

    for i, message in enumerate(messages):
        if message["role"] == "user":
            offered = {b["id"] for b in blocks(messages[i - 1], "tool_use")} if i else set()
            if any(b["tool_use_id"] not in offered for b in blocks(message, "tool_result")):
                return False
        else:
            answered = {b["tool_use_id"] for b in blocks(messages[i + 1], "tool_result")} \
                if i + 1 < len(messages) else set()
            if any(b["id"] not in answered for b in blocks(message, "tool_use")):
                return False
    return True


def has_cjk(text: str) -> bool:
    return bool(_CJK.search(text))


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


@dataclass
class Recording(Model):
    """Wraps a model and keeps every decision request it was asked."""

    inner: Model
    requests: list[DecisionRequest] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.name = self.inner.name
        self.history_turns = getattr(self.inner, "history_turns", 0)

    async def decide(self, request: DecisionRequest) -> Decision:
        self.requests.append(request)
        return await self.inner.decide(request)

    async def route(self, request: Any) -> Any:
        return await self.inner.route(request)

    async def summarise(self, request: Any) -> str:
        return await self.inner.summarise(request)


@pytest.fixture
async def shop() -> AsyncIterator[Shop]:
    async with Shop() as opened:
        yield opened


@pytest.fixture
def actions(shop: Shop) -> ActionRegistry:
    return build_actions(shop)


@pytest.fixture
def small_flows(tmp_path: Path, actions: ActionRegistry) -> FlowSet:
    """The demo flows with a 3,000-token budget for the refund flow."""
    return load_demo_flows(flow_copy(tmp_path / "flows", max_context_tokens=SMALL_BUDGET),
                           actions)


async def assert_refunded_the_corrected_order(chat: LongChat, shop: Shop, source: str) -> None:
    """The journey ended with the corrected order refunded, and the store shows why."""
    conv = await chat.conv()
    assert (conv.flow, conv.state, conv.owner) == ("refund", "refunded", "bot")
    assert {k: v["v"] for k, v in conv.entities.items()} == {"order_id": NEW_ORDER,
                                                             "reason": "damaged"}
    assert len(await shop.refunds_for_order(NEW_ORDER)) == 1
    assert await shop.refunds_for_order(OLD_ORDER) == []
    # Provenance: the correction wins, and the history shows both values.
    history = await chat.store.entity_history(conv.id, "order_id")
    assert [(c.value, c.previous, c.turn, c.source) for c in history] == [
        (OLD_ORDER, None, 4, source), (NEW_ORDER, OLD_ORDER, CORRECTION_TURN, source)]
    assert conv.entities["order_id"]["t"] == CORRECTION_TURN


# --- Claude (the stand-in behind the fake Messages API) ----------------------------------------


@pytest.mark.parametrize("language", ["en", "zh"])
async def test_sixty_turns_through_claude(language: str, fake: FakeClaude, claude: ClaudeModel,
                                          small_flows: FlowSet, actions: ActionRegistry,
                                          shop: Shop) -> None:
    summary_delay = 0.5
    standin = StandInClaude(drift_to=NEW_ORDER, stale=OLD_ORDER,
                            summary_delay=summary_delay).install(fake)
    metrics = Metrics(multiprocess_dir="")
    chat = make_chat(small_flows, actions, claude, thread=f"claude-{language}", fake=fake,
                     metrics=metrics)
    script = SCRIPTS[language]
    assert len(script) == 60
    turns = await chat.talk(script, pause=0.02)
    await chat.engine.drain()
    budget = budget_tokens(SMALL_BUDGET, 0.2)

    for turn in turns:
        assert len(turn.requests) == 1, turn.number  # one decision per customer message
        request = turn.requests[0]
        assert request.status == 200, (turn.number, request.response_json)
        counted, estimated = request_tokens(request)
        # Under the budget at every turn: the engine's estimate under the usable budget,
        # the fake's independent count under the flow's maximum.
        assert estimated <= budget, turn.number
        assert counted <= SMALL_BUDGET, turn.number
        # The current question is never trimmed away, and tool-use pairs are never split.
        assert customer_text(request) == turn.text
        assert tool_pairs_intact(request.messages), turn.number
        # The memory check runs every third turn (check_every: 3).
        required = request.tool(DECISION)["input_schema"]["required"]  # type: ignore[index]
        assert ("pinned" in required) == (turn.number % 3 == 0), turn.number
        # A reply never waits for a summary (each summary call takes summary_delay).
        if turn.summaries_before:
            assert turn.seconds < summary_delay, (turn.number, turn.seconds)
        assert turn.replies, turn.number
    assert not fake.handler_errors
    assert all(r.status == 200 for r in fake.requests), [r.status for r in fake.requests]

    # The budget mattered: later requests were trimmed to a window, not the full history.
    assert max(len(t.requests[0].messages) for t in turns) <= 2 * 6 + 1
    # Replies went out while a summary was being written, many times.
    assert sum(1 for t in turns if t.summaries_before and t.summaries_pending) >= 20

    # Pinned entities in the final request: the corrected values, from the store.
    final = turns[-1].requests[0]
    assert known_facts(final.system_text) == {"order_id": NEW_ORDER, "reason": "damaged"}
    assert OLD_ORDER not in final.system_text
    await assert_refunded_the_corrected_order(chat, shop, "model")

    # The deliberate wrong echo (first check after the correction, turn 33) is detected,
    # logged, counted, and corrected once in the next prompt.
    assert standin.drifted is turns[32].requests[0]
    [mismatch] = await chat.events("memory_mismatch")
    assert mismatch.data == {"mismatches": {"order_id": {"model": OLD_ORDER,
                                                         "store": NEW_ORDER}}}
    assert (await chat.conv()).counters["memory_mismatches"] == 1
    assert sample(metrics, "helpline_memory_mismatches_total") == 1
    note = (f"Note: Correction from the system of record: order_id is '{NEW_ORDER}', "
            f"not '{OLD_ORDER}'.")
    assert [t.number for t in turns if note in t.requests[0].system_text] == [34]
    checks = await chat.events("memory_check")
    assert len(checks) == 60 // 3 - 1 and all(c.data == {"ok": True} for c in checks)

    # Summaries ran in the background and reached the system prompt, in the right language.
    summaries = await chat.events("summary")
    assert len(summaries) >= 3 and all(s.data["ok"] for s in summaries)
    assert standin.summaries == len(summaries)
    assert sample(metrics, "helpline_summaries_total", outcome="ok") == len(summaries)
    conv = await chat.conv()
    assert conv.summary.startswith(f"Customer language: {language}\n")
    assert f"Summary of the conversation so far:\nCustomer language: {language}" in \
        final.system_text
    first_summarised = next(t.number for t in turns
                            if "Summary of the conversation" in t.requests[0].system_text)
    assert first_summarised < CORRECTION_TURN

    # Decisions are replayed as tool calls with the engine's verdict.
    decisions = await chat.events("decision")
    assert len(decisions) == 60
    assert all(d.data["tool_use_id"].startswith("toolu_") for d in decisions)
    assert "state is now refunded" in decisions[-1].data["verdict"]

    # Prompt caching: the stable prefix (tool, rules, state) is read from the cache except
    # when it changes (a new state, the first memory-check variant of the tool).
    reads = [t.requests[0].response_json["usage"]["cache_read_input_tokens"] for t in turns]
    assert claude.usage.cache_read_input_tokens == sum(reads)
    assert sum(1 for n in reads if n > 0) >= 50

    # The customer's language holds for 60 turns.
    replies = [text for t in turns for text in t.replies]
    if language == "zh":
        assert all(has_cjk(text) for text in replies)
        assert all("Reply in the customer's language (zh)" in t.requests[0].system_text
                   for t in turns)
        assert has_cjk(conv.summary)
    else:
        assert not any(has_cjk(text) for text in replies)


@pytest.mark.parametrize("language", ["en", "zh"])
async def test_a_failing_summary_call_never_breaks_the_conversation(
    language: str, fake: FakeClaude, claude: ClaudeModel, small_flows: FlowSet,
    actions: ActionRegistry, shop: Shop
) -> None:
    StandInClaude(drift_to=None).install(fake)
    overloaded = fake.fail_when(is_summary, 529)
    metrics = Metrics(multiprocess_dir="")
    chat = make_chat(small_flows, actions, claude, thread=f"overloaded-{language}", fake=fake,
                     metrics=metrics)
    turns = await chat.talk(SCRIPTS[language], pause=0.01)
    await chat.engine.drain()
    budget = budget_tokens(SMALL_BUDGET, 0.2)

    assert overloaded.hits >= 3
    assert all(t.replies and t.requests[0].status == 200 for t in turns)
    assert all(request_tokens(t.requests[0])[1] <= budget for t in turns)
    await assert_refunded_the_corrected_order(chat, shop, "model")

    # Every summary fell back to the extractive one, was counted as an error, and still
    # bounded the context.
    summaries = await chat.events("summary")
    assert len(summaries) == overloaded.hits
    assert not any(s.data["ok"] for s in summaries)
    assert sample(metrics, "helpline_summaries_total", outcome="error") == overloaded.hits
    assert sample(metrics, "helpline_summaries_total", outcome="ok") == 0
    conv = await chat.conv()
    assert conv.summary.startswith(f"Customer language: {language}\n- customer: ")
    final = turns[-1].requests[0]
    assert known_facts(final.system_text) == {"order_id": NEW_ORDER, "reason": "damaged"}
    assert "Summary of the conversation so far:" in final.system_text


# --- the offline model ---------------------------------------------------------------------------


@pytest.mark.parametrize("language", ["en", "zh"])
async def test_sixty_turns_offline(language: str, small_flows: FlowSet,
                                   actions: ActionRegistry, shop: Shop) -> None:
    model = Recording(OfflineModel())
    metrics = Metrics(multiprocess_dir="")
    chat = make_chat(small_flows, actions, model, thread=f"offline-{language}", metrics=metrics)
    turns = await chat.talk(SCRIPTS[language])
    await chat.engine.drain()

    assert all(t.replies for t in turns)
    assert len(model.requests) == 60
    await assert_refunded_the_corrected_order(chat, shop, "customer")
    final = model.requests[-1]
    assert {n: final.entities.get(n) for n in small_flows["refund"].pinned} == {
        "order_id": NEW_ORDER, "reason": "damaged"}

    # What Claude would have been sent for each of these requests fits the budget, and
    # its pinned facts come from the store.
    view = ClaudeModel(api_key="not-used")
    try:
        budget = budget_tokens(SMALL_BUDGET, 0.2)
        flow = small_flows["refund"]
        for request in model.requests:
            system = view.system_blocks(request)
            tool = view.decision_tool(flow, request.state)
            view.fit(flow, system, view.messages(request.history, request.text), [tool])
            assert view.last_request_tokens <= budget
        facts = known_facts("\n".join(b["text"] for b in view.system_blocks(final)))
        assert facts == {"order_id": NEW_ORDER, "reason": "damaged"}
    finally:
        await view.close()

    # The deterministic memory check: every third turn, always in agreement.
    checks = await chat.events("memory_check")
    assert len(checks) == 20 and all(c.data["ok"] for c in checks)
    assert await chat.events("memory_mismatch") == []
    assert sample(metrics, "helpline_memory_mismatches_total") == 0

    # Extractive summaries, bounded, in the customer's language.
    summaries = await chat.events("summary")
    assert len(summaries) >= 5 and all(s.data["ok"] for s in summaries)
    conv = await chat.conv()
    assert conv.summary.startswith(f"Customer language: {language}\n")
    assert len(conv.summary.splitlines()) <= 13
    assert model.requests[-1].summary == conv.summary or summaries[-1].seq > \
        max(r.seq for r in await chat.store.messages(conv.id) if r.direction == "in")
    replies = [text for t in turns for text in t.replies]
    if language == "zh":
        assert all(has_cjk(text) for text in replies)
    else:
        assert not any(has_cjk(text) for text in replies)
