"""Generate the bundled Korean sample ``ko_sample/`` (KoChatGPT format). Deterministic: run it, commit the output.

    python tools/make_sample.py                       # rewrites rlhf_ablate/data/ko_sample/*.jsonl

Written for this project (no third-party text). 70 subjects over 10 topics, each with a short definition and a
recommended practice; five question forms per subject. Answers are templates of these two facts, so a tiny model
can learn them (non-trivial ROUGE). The ranked groups are built so that a tiny reward model can learn the easy
part but NOT saturate (an earlier version with only clear-cut groups gave held-out accuracy and Kendall tau 1.000
for every LoRA rank and seed, so a rank ablation could not tell configurations apart). Real preference data has
close calls between two good answers and annotator disagreement, so the 130 base groups are, in fixed shares
(applied separately to the groups the default split holds out, so the RM eval has the same mix):

- 45 % easy groups: rank 1 polite on-topic Korean (-습니다/-요) that re-uses the subject; rank 2 truncated
  mid-sentence or rude banmal; rank 3 off-topic rambling or a repetition loop; rank 4 (a third of all groups)
  not Korean.
- 35 % close calls with two polite answers on top (CLOSE2_SHARE): rank 1 answers the question concretely; rank 2
  is a near miss, as polite and as long: a vague answer in the same template that opens with a hedge and gives
  no concrete fact ("사람마다 다르지만 ... 자신에게 맞는 좋은 방법을 찾아보는 것이 좋습니다", half of them), the
  answer to a neighbouring question about the same subject (the practice when the definition was asked, or the
  other way round), or a fluent but wrong tip taken from a sibling subject of the same topic. Clearly bad answers
  follow.
- 20 % close calls with three polite answers on top (CLOSE3_SHARE): concrete answer > neighbouring question >
  vague or wrong tip, and in 4-answer groups one clearly bad answer last.
- Annotator noise (NOISY_SHARE): in 12 % of the base groups (16 of 130, about 22 % of the close calls, in line
  with the 25-35 % disagreement of human annotators on close pairs) two ADJACENT polite answers swap ranks.
  Only polite answers move, so rank 1 is never garbage and v2's "drop a group whose dirty answer is ranked above
  a clean one" rule keeps these groups: the noise is label noise, not dirt.
Length is NOT the signal: off-topic answers are the longest, loops are longer than truncated answers and near
misses are as long as the answers they lose to, so rank-1 answers are not systematically the longest (`data
stats` reports mean length by rank). Polite answers have 15-60 Hangul syllables.

The v1 files also hold planted dirt that v2 must remove, in every training file: exact and near duplicates, NFD
Hangul and messy whitespace, length outliers, evasive boilerplate, non-Korean answers and repetition loops (see
`plant_*`). The eval file is clean and shares no prompt with the training files.
"""

from __future__ import annotations

import json
import random
import unicodedata
from pathlib import Path

from rlhf_ablate.data.readers import prompt_id
from rlhf_ablate.data.splits import is_eval

OUT = Path(__file__).resolve().parents[1] / "rlhf_ablate" / "data" / "ko_sample"
SEED = 20240611
N_EVAL = 50
N_RM = 130
N_PPO = 100
CLOSE2_SHARE = 0.35  # base RM groups whose top two answers are both polite on-topic Korean
CLOSE3_SHARE = 0.20  # ... whose top three are; the other 45 % have one good answer above clearly bad ones
NOISY_SHARE = 0.12  # groups with an adjacent polite pair swapped (annotator noise): ~22 % of the close calls

# topic -> (closing sentence, [(subject, definition, practice as an adnominal clause)])
TOPICS: dict[str, tuple[str, list[tuple[str, str, str]]]] = {
    "일상": ("작은 습관이 하루를 바꿉니다.", [
        ("아침 습관", "하루를 상쾌하게 시작하게 돕는 작은 행동", "일어나자마자 물 한 잔을 마시는"),
        ("방 청소", "생활 공간을 깨끗하게 유지하는 일", "매일 십 분씩 정리하는"),
        ("빨래", "옷을 깨끗하고 위생적으로 관리하는 일", "색깔별로 나누어 세탁하는"),
        ("장보기", "필요한 식재료와 생활용품을 사는 일", "미리 목록을 적어 가는"),
        ("수면 습관", "건강한 하루를 만드는 잠자는 규칙", "매일 같은 시간에 잠자리에 드는"),
        ("시간 관리", "하루의 일을 계획하고 나누는 방법", "중요한 일부터 먼저 처리하는"),
        ("이웃과의 인사", "동네 사람들과 가까워지는 예절", "먼저 밝게 웃으며 인사하는"),
    ]),
    "건강": ("건강을 위해 꾸준히 실천해 보세요.", [
        ("스트레칭", "굳은 근육을 부드럽게 풀어 주는 운동", "아침과 저녁에 천천히 몸을 늘이는"),
        ("물 마시기", "몸의 수분을 채우는 기본 습관", "하루에 여덟 잔 정도 나누어 마시는"),
        ("감기 예방", "겨울철 건강을 지키는 생활 습관", "손을 자주 씻고 충분히 쉬는"),
        ("건강 검진", "질병을 일찍 발견하는 정기 검사", "일 년에 한 번 병원에서 받는"),
        ("스트레스 관리", "마음의 긴장을 줄이는 방법", "산책하며 깊게 호흡하는"),
        ("바른 자세", "허리와 목의 부담을 줄이는 몸가짐", "의자에 허리를 펴고 앉는"),
        ("균형 잡힌 식사", "영양소를 고루 먹는 식습관", "채소와 단백질을 함께 먹는"),
    ]),
    "요리": ("맛있게 만들어 드세요.", [
        ("김치찌개", "잘 익은 김치와 돼지고기로 끓이는 찌개", "김치를 먼저 볶은 뒤 물을 붓는"),
        ("된장국", "된장을 풀어 채소와 함께 끓이는 국", "멸치 육수에 된장을 체에 걸러 푸는"),
        ("계란말이", "달걀을 얇게 부쳐 돌돌 마는 반찬", "약한 불에서 천천히 말아 주는"),
        ("비빔밥", "밥 위에 나물과 고추장을 올려 비벼 먹는 음식", "나물을 따로 무쳐 색깔별로 올리는"),
        ("불고기", "양념한 소고기를 구운 한국 음식", "간장 양념에 고기를 미리 재워 두는"),
        ("떡볶이", "떡을 고추장 양념에 졸인 간식", "양념이 떡에 배도록 약한 불에 졸이는"),
        ("잡채", "당면과 채소를 볶아 무친 잔치 음식", "당면을 삶은 뒤 채소와 따로 볶는"),
    ]),
    "여행": ("즐거운 여행이 되길 바랍니다.", [
        ("제주도 여행", "바다와 오름을 즐길 수 있는 섬 여행", "렌터카를 미리 예약해 두는"),
        ("여권 발급", "해외여행에 꼭 필요한 신분증을 만드는 일", "출국 한 달 전에 구청에서 신청하는"),
        ("여행 가방 싸기", "필요한 짐을 가볍게 챙기는 준비", "옷을 돌돌 말아서 넣는"),
        ("기차 여행", "창밖 풍경을 보며 편하게 이동하는 여행", "좌석을 미리 예매하는"),
        ("숙소 예약", "여행지에서 머물 곳을 정하는 일", "후기를 꼼꼼히 읽고 고르는"),
        ("환전", "다른 나라 돈으로 바꾸는 일", "은행 앱으로 미리 신청하는"),
        ("여행 일정", "여행 동안 할 일을 정리한 계획", "하루에 두세 곳만 여유 있게 넣는"),
    ]),
    "공부": ("꾸준히 하면 실력이 늘어납니다.", [
        ("영어 단어 암기", "영어 실력의 기초를 쌓는 공부", "매일 스무 개씩 소리 내어 외우는"),
        ("수학 문제 풀이", "개념을 적용해 답을 찾는 연습", "틀린 문제를 다시 풀어 보는"),
        ("시험 준비", "배운 내용을 정리하고 복습하는 과정", "계획표를 만들어 과목별로 나누는"),
        ("독서", "책을 읽으며 생각을 넓히는 활동", "하루에 삼십 분씩 꾸준히 읽는"),
        ("필기", "수업 내용을 짧게 정리하는 방법", "핵심 단어 위주로 적는"),
        ("집중력", "한 가지 일에 오래 몰두하는 힘", "휴대폰을 멀리 두고 공부하는"),
        ("복습", "배운 내용을 다시 떠올리는 공부", "배운 날 저녁에 한 번 더 보는"),
    ]),
    "컴퓨터": ("컴퓨터를 더 편하게 쓰실 수 있습니다.", [
        ("파이썬", "배우기 쉬운 프로그래밍 언어", "작은 예제를 직접 입력해 보는"),
        ("비밀번호 관리", "계정을 안전하게 지키는 습관", "사이트마다 다른 비밀번호를 쓰는"),
        ("파일 백업", "중요한 자료를 복사해 두는 일", "외장 하드와 클라우드에 함께 저장하는"),
        ("컴퓨터 속도", "컴퓨터가 작업을 처리하는 빠르기", "안 쓰는 프로그램을 지우는"),
        ("악성 코드", "컴퓨터에 피해를 주는 나쁜 프로그램", "백신을 켜 두고 수상한 파일을 열지 않는"),
        ("엑셀", "표와 계산을 다루는 프로그램", "자주 쓰는 함수부터 익히는"),
        ("인터넷 공유기", "집 안에 와이파이를 나누어 주는 장치", "가끔 전원을 껐다가 다시 켜는"),
    ]),
    "경제": ("계획적인 소비가 중요합니다.", [
        ("저축", "미래를 위해 돈을 모으는 일", "월급을 받으면 먼저 일정 금액을 떼어 두는"),
        ("가계부", "수입과 지출을 기록하는 장부", "매일 쓴 돈을 바로 적는"),
        ("금리", "돈을 빌리거나 맡길 때 붙는 이자의 비율", "예금과 대출의 금리를 비교해 보는"),
        ("물가", "여러 상품의 평균적인 가격 수준", "물가 지수를 꾸준히 살펴보는"),
        ("신용 점수", "금융 거래의 믿음을 나타내는 점수", "카드 대금을 늦지 않게 갚는"),
        ("주식 투자", "회사의 주식을 사서 이익을 기대하는 투자", "여러 종목에 나누어 투자하는"),
        ("용돈 관리", "정해진 돈을 계획적으로 쓰는 연습", "쓸 곳을 미리 정하고 쓰는"),
    ]),
    "과학": ("주변에서 쉽게 관찰할 수 있습니다.", [
        ("광합성", "식물이 빛으로 양분을 만드는 과정", "잎에 햇빛이 잘 들게 하는"),
        ("중력", "물체가 서로 끌어당기는 힘", "떨어지는 물체를 관찰해 보는"),
        ("태양계", "태양과 그 둘레를 도는 행성의 모임", "행성의 순서를 그림으로 정리하는"),
        ("화산", "땅속 마그마가 분출하는 산", "화산 지형 사진을 함께 찾아보는"),
        ("세포", "생물을 이루는 가장 작은 단위", "현미경으로 양파 세포를 관찰하는"),
        ("날씨 변화", "기온과 바람과 비가 바뀌는 현상", "매일 기온을 기록해 보는"),
        ("전기 회로", "전기가 흐르는 길", "건전지와 전구로 직접 연결해 보는"),
    ]),
    "운동": ("무리하지 말고 즐겁게 운동하세요.", [
        ("달리기", "심장과 다리를 튼튼하게 하는 운동", "천천히 시작해 거리를 조금씩 늘리는"),
        ("수영", "물속에서 온몸을 쓰는 운동", "호흡법부터 차근차근 배우는"),
        ("등산", "산을 오르며 체력을 기르는 운동", "편한 등산화를 신고 천천히 오르는"),
        ("요가", "호흡과 자세로 몸과 마음을 다스리는 운동", "무리하지 않고 동작을 따라 하는"),
        ("근력 운동", "근육의 힘을 키우는 운동", "가벼운 무게로 정확한 자세를 익히는"),
        ("자전거 타기", "바퀴를 굴려 이동하며 하는 운동", "헬멧을 쓰고 자전거 도로를 이용하는"),
        ("줄넘기", "줄을 넘으며 하는 간단한 유산소 운동", "발끝으로 가볍게 뛰는"),
    ]),
    "환경": ("작은 실천이 지구를 지킵니다.", [
        ("분리수거", "쓰레기를 종류별로 나누어 버리는 일", "씻어서 말린 뒤 종류별로 버리는"),
        ("플라스틱 줄이기", "일회용 플라스틱 사용을 줄이는 실천", "장바구니와 텀블러를 챙기는"),
        ("에너지 절약", "전기와 가스를 아껴 쓰는 일", "안 쓰는 전등과 플러그를 끄는"),
        ("나무 심기", "숲을 가꾸고 공기를 맑게 하는 활동", "식목일에 동네 공원에서 함께 심는"),
        ("미세먼지", "공기 중에 떠다니는 아주 작은 먼지", "외출할 때 마스크를 쓰는"),
        ("물 절약", "물을 아껴 쓰는 생활 습관", "양치할 때 컵을 사용하는"),
        ("음식물 쓰레기", "먹고 남은 음식으로 생기는 쓰레기", "먹을 만큼만 요리하는"),
    ]),
}


def has_batchim(word: str) -> bool:
    c = word.strip()[-1]
    return "가" <= c <= "힣" and (ord(c) - 0xAC00) % 28 != 0


def josa(word: str, with_b: str, without_b: str) -> str:
    return word + (with_b if has_batchim(word) else without_b)


# (question form, answer form); {x} subject, {what} definition, {how} practice, {close} topic closing sentence
FORMS = [
    ("{x_iga} 무엇인가요?", "{x_eun} {what}입니다. {close}"),
    ("{x_eun} 어떻게 하면 좋을까요?", "{x_eun} {how} 것이 좋습니다. 처음에는 천천히 시작해 보세요."),
    ("{x}에 대해 간단히 설명해 주세요.", "{x_eun} {what}입니다. 보통 {how} 것이 좋습니다."),
    ("{x_wa} 관련해서 조언을 해 주세요.", "{x_wa} 관련해서는 {how} 것을 추천합니다. {close}"),
    ("{x_eul} 잘 하는 방법이 궁금해요.", "{x_eul} 잘 하려면 {how} 것이 중요합니다. 꾸준히 연습해 보세요."),
]

RUDE = [
    "{x}? 그걸 왜 나한테 물어. 알아서 해.",
    "몰라. {x} 같은 건 네가 찾아봐.",
    "{x_eun} 그냥 대충 하면 돼. 귀찮게 하지 마.",
]
LOOP_WORDS = ["좋아요", "정말", "그리고", "네네", "맞아요"]
ENGLISH = [
    "I think this is very good. You should just try it and see what happens.",
    "Sorry I do not know about that, maybe you can search it on the internet.",
    "The answer is yes and no, it depends on many things in the world.",
    "geunyang haseyo, ok ok, jalhaseyo, gamsahamnida.",
    "This question is interesting but the weather is nice today in the city.",
]
EVASIVE = [
    "죄송하지만 저는 AI 언어 모델이므로 {x}에 대해서는 답변드릴 수 없습니다.",
    "저는 인공지능이기 때문에 {x}에 대한 개인적인 조언을 드리기 어렵습니다.",
    "죄송합니다. 저는 AI 어시스턴트로서 {x}에 대해 정확한 답변을 드릴 수 없습니다.",
]


# Generic filler for "vague" near misses: polite and on-topic, but says nothing specific about the subject.
VAGUE_WHAT = ["우리 생활에서 자주 접하는 일", "많은 사람들이 관심을 가지는 주제", "알아 두면 여러모로 도움이 되는 것",
              "생활 속에서 중요하게 여겨지는 것"]
VAGUE_HOW = ["자신에게 맞는 좋은 방법을 찾아보는", "기본을 잘 지키면서 꾸준히 하는", "상황에 맞게 알맞은 방법을 고르는",
             "주변의 조언을 참고해 천천히 해 보는", "너무 무리하지 않고 적당히 하는"]
HEDGES = ["사람마다 다르지만", "경우에 따라 다르지만", "정답은 없지만", "글쎄요,"]
# A neighbouring question about the same subject: definition (form 0) <-> practice (forms 1, 3, 4); form 2 asks
# for both, so answering either one alone is the near miss.
NEIGHBOUR_FORMS = {0: [1, 3, 4], 1: [0], 2: [0, 1], 3: [0], 4: [0]}


def fill(template: str, subj: tuple[str, str, str], close: str) -> str:
    x, what, how = subj
    return template.format(x=x, what=what, how=how, close=close, x_eun=josa(x, "은", "는"),
                           x_iga=josa(x, "이", "가"), x_eul=josa(x, "을", "를"), x_wa=josa(x, "과", "와"))


def items() -> list[dict]:
    """Every (subject, form) as {prompt, completion, topic, subject}."""
    out = []
    for topic, (close, subjects) in TOPICS.items():
        for subj in subjects:
            for f, (q, a) in enumerate(FORMS):
                out.append({"prompt": fill(q, subj, close), "completion": fill(a, subj, close),
                            "topic": topic, "subject": subj, "form": f})
    return out


def truncated(text: str, rng: random.Random) -> str:
    """Cut mid-sentence inside a word, so the answer stops without an ending."""
    cut = int(len(text) * rng.uniform(0.4, 0.6))
    while cut < len(text) - 1 and (text[cut - 1] in " ." or text[cut] in " ."):
        cut += 1
    return text[:cut]


def off_topic(it: dict, pool: list[dict], rng: random.Random) -> str:
    """A polite, complete but longer answer about a subject of another topic."""
    a = rng.choice([o for o in pool if o["topic"] != it["topic"]])
    return fill("{x_eun} {what}입니다. 보통 {how} 것이 좋습니다. {close}", a["subject"], TOPICS[a["topic"]][0])


def loop(it: dict, rng: random.Random) -> str:
    w = rng.choice(LOOP_WORDS)
    return josa(it["subject"][0], "은", "는") + " " + " ".join([w] * rng.randint(7, 10))


def bad_answer(it: dict, pool: list[dict], rng: random.Random, kinds: str = "trol") -> str:
    """One clearly bad answer: t(runcated), r(ude), o(ff-topic) or l(oop)."""
    k = rng.choice(kinds)
    if k == "t":
        return truncated(it["completion"], rng)
    if k == "r":
        return fill(rng.choice(RUDE), it["subject"], "")
    return off_topic(it, pool, rng) if k == "o" else loop(it, rng)


def easy_group(it: dict, pool: list[dict], rng: random.Random, k: int) -> list[str]:
    """Answers best first: one good answer above clearly bad ones (the easy part of the task)."""
    x = it["subject"]
    second = truncated(it["completion"], rng) if rng.random() < 0.5 else fill(rng.choice(RUDE), x, "")
    third = off_topic(it, pool, rng) if rng.random() < 0.5 else loop(it, rng)
    answers = [it["completion"], second, third]
    if k == 4:
        answers.append(rng.choice(ENGLISH))
    return answers


def vague(it: dict, rng: random.Random) -> str:
    """The item's own answer template with the concrete definition and tip replaced by generic filler, opened
    with a hedge ("사람마다 다르지만"), as noncommittal answers are."""
    close = TOPICS[it["topic"]][0]
    body = fill(FORMS[it["form"]][1], (it["subject"][0], rng.choice(VAGUE_WHAT), rng.choice(VAGUE_HOW)), close)
    return rng.choice(HEDGES) + " " + body


def other_question(it: dict, rng: random.Random) -> str:
    """A good answer about the same subject, but to a neighbouring question: the practice when the definition was
    asked, the definition when the practice was asked."""
    form = rng.choice(NEIGHBOUR_FORMS[it["form"]])
    return fill(FORMS[form][1], it["subject"], TOPICS[it["topic"]][0])


def wrong_tip(it: dict, rng: random.Random) -> str:
    """The item's answer template, fluent and concrete, but with the definition and tip of a sibling subject of the
    same topic: plausible unless one knows the subject (a hallucinated answer)."""
    topic, subjects = it["topic"], TOPICS[it["topic"]][1]
    other = rng.choice([s for s in subjects if s != it["subject"]])
    return fill(FORMS[it["form"]][1], (it["subject"][0], other[1], other[2]), TOPICS[topic][0])


def near_miss(it: dict, rng: random.Random) -> str:
    """A polite on-topic Korean answer that is worse than the item's own for a subtle reason."""
    k = rng.choice(["vague", "vague", "other", "wrong"])
    return vague(it, rng) if k == "vague" else other_question(it, rng) if k == "other" else wrong_tip(it, rng)


def close_group(it: dict, pool: list[dict], rng: random.Random, k: int, n_polite: int) -> list[str]:
    """Answers best first: the top ``n_polite`` (2 or 3) are all polite on-topic Korean (close calls), the rest
    clearly bad. With three polite answers the order is: answers the question > answers a neighbouring question
    about the same subject > vague or wrong."""
    if n_polite == 2:
        polite = [it["completion"], near_miss(it, rng)]
    else:
        third = vague(it, rng) if rng.random() < 0.5 else wrong_tip(it, rng)
        polite = [it["completion"], other_question(it, rng), third]
    answers = polite
    if len(answers) < k:
        answers.append(bad_answer(it, pool, rng))
    if len(answers) < k:
        answers.append(rng.choice(ENGLISH) if rng.random() < 0.5 else bad_answer(it, pool, rng, "ol"))
    return answers


def annotator_noise(best_first: list[str], n_polite: int, rng: random.Random) -> tuple[list[str], int]:
    """Swap two adjacent polite answers (a close call two annotators would rank differently); never touches the
    clearly bad ones, so a dirty answer never moves above a clean one. Returns (answers, i): ranks i+1 and i+2
    were swapped."""
    i = rng.randrange(n_polite - 1)
    out = list(best_first)
    out[i], out[i + 1] = out[i + 1], out[i]
    return out, i


def kochatgpt_rm_row(prompt: str, best_first: list[str], rng: random.Random) -> dict:
    """KoChatGPT layout: shuffled completion_i and `ranking` = completion indices, best first."""
    order = list(range(len(best_first)))
    rng.shuffle(order)  # order[r] = the completion slot of the r-th best answer
    row = {"prompt": prompt}
    slots = [None] * len(best_first)
    for r, slot in enumerate(order):
        slots[slot] = best_first[r]
    for i, text in enumerate(slots):
        row[f"completion_{i}"] = text
    row["ranking"] = order
    return row


def nfd(text: str) -> str:
    return unicodedata.normalize("NFD", text)


def messy(text: str) -> str:
    return "  " + text.replace(" ", "  \t", 2).replace(". ", ".   ") + "  \n"


def near(text: str, punct: bool = True) -> str:
    """A near copy: one space dropped (the commonest Korean variant) and, for answers, the final "." -> "!"."""
    t = text.replace(" ", "", 1)
    return t[:-1] + "!" if punct and t.endswith(".") else t


def rm_plan(rng: random.Random, held_out: list[bool]) -> list[tuple[int, bool]]:
    """(number of polite answers at the top, annotator noise?) for each base RM group.

    The shares (CLOSE2_SHARE, CLOSE3_SHARE, NOISY_SHARE) are exact counts, not coin flips, and are applied
    separately to the groups the default split holds out (``held_out``) and to the rest, so the held-out RM eval
    has the same mix of close calls and noise as training rather than whatever a 26-group sample happens to get.
    """
    plan: list[tuple[int, bool]] = [(1, False)] * len(held_out)
    for side in (True, False):
        idx = [i for i, h in enumerate(held_out) if h == side]
        n2, n3 = round(CLOSE2_SHARE * len(idx)), round(CLOSE3_SHARE * len(idx))
        kinds = [2] * n2 + [3] * n3 + [1] * (len(idx) - n2 - n3)
        rng.shuffle(kinds)
        close = [i for i, k in zip(idx, kinds) if k > 1]
        noisy = set(rng.sample(close, round(NOISY_SHARE * len(idx))))
        for i, k in zip(idx, kinds):
            plan[i] = (k, i in noisy)
    return plan


def build(seed: int = SEED, meta: list | None = None) -> dict[str, list[dict]]:
    """All four files. ``meta``, when given, receives one {row, polite, swapped} per base RM group (``row`` is
    the rm row itself, as written; the rows ``plant_rm`` adds are not in it): ``polite`` is the number of polite answers at the top (1 = easy group),
    ``swapped`` the 0-based rank whose answer annotator noise swapped with the next one (None: no noise)."""
    rng = random.Random(seed)
    pool = items()
    rng.shuffle(pool)
    evals, train = pool[:N_EVAL], pool[N_EVAL:]

    sft = [{"prompt": it["prompt"], "completion": it["completion"]} for it in train]
    rm_items = rng.sample(train, N_RM)
    # The default split (data.eval_fraction 0.2, data.split_seed 0; see splits.py) decides the held-out groups.
    plan = rm_plan(rng, [is_eval(prompt_id(it["prompt"]), 0.2, 0) for it in rm_items])
    rm = []
    for n, (it, (n_polite, noisy)) in enumerate(zip(rm_items, plan)):
        k, swapped = 4 if n % 3 == 0 else 3, None
        if n_polite == 1:
            best_first = easy_group(it, pool, rng, k)
        else:
            best_first = close_group(it, pool, rng, k, n_polite)
            if noisy:
                best_first, swapped = annotator_noise(best_first, n_polite, rng)
        rm.append(kochatgpt_rm_row(it["prompt"], best_first, rng))
        if meta is not None:
            meta.append({"row": rm[-1], "polite": n_polite, "swapped": swapped})
    ppo = [{"prompt": it["prompt"]} for it in rng.sample(train, N_PPO)]
    plant_sft(sft, train, rng)
    plant_rm(rm, train, pool, rng)
    plant_ppo(ppo, train, rng)
    ev = [{"prompt": it["prompt"], "completion": it["completion"]} for it in evals]
    return {"sft": sft, "rm": rm, "ppo": ppo, "eval": ev}


def _insert(rows: list, new: dict, rng: random.Random) -> None:
    rows.insert(rng.randrange(len(rows) + 1), new)


def plant_sft(sft: list[dict], train: list[dict], rng: random.Random) -> None:
    base = list(sft)
    for row in rng.sample(base, 8):  # exact duplicates
        _insert(sft, dict(row), rng)
    for row in rng.sample(base, 8):  # near duplicates
        _insert(sft, {"prompt": row["prompt"], "completion": near(row["completion"])}, rng)
    for row in rng.sample(base, 6):  # NFD copies (exact duplicates once normalised)
        _insert(sft, {"prompt": nfd(row["prompt"]), "completion": nfd(row["completion"])}, rng)
    for row in rng.sample(base, 4):  # whitespace-variant copies
        _insert(sft, {"prompt": messy(row["prompt"]), "completion": messy(row["completion"])}, rng)
    for row in rng.sample(sft, 6):  # NFD and messy whitespace in place (normalised, not dropped)
        row["prompt"], row["completion"] = nfd(row["prompt"]), messy(nfd(row["completion"]))
    for it in rng.sample(train, 4):  # length outliers: five answers pasted together
        same = [o["completion"] for o in train if o["subject"] == it["subject"]]
        _insert(sft, {"prompt": it["prompt"], "completion": " ".join(same * 2)}, rng)
    for it in rng.sample(train, 8):  # evasive boilerplate
        _insert(sft, {"prompt": it["prompt"], "completion": fill(rng.choice(EVASIVE), it["subject"], "")}, rng)
    for it in rng.sample(train, 6):  # not Korean
        _insert(sft, {"prompt": it["prompt"], "completion": rng.choice(ENGLISH)}, rng)
    for it in rng.sample(train, 5):  # repetition loops
        _insert(sft, {"prompt": it["prompt"], "completion": loop(it, rng)}, rng)


def plant_rm(rm: list[dict], train: list[dict], pool: list[dict], rng: random.Random) -> None:
    base = list(rm)
    for row in rng.sample(base, 5):  # exact duplicates (re-shuffled slots: the same ranked answers)
        best_first = [row[f"completion_{i}"] for i in row["ranking"]]
        _insert(rm, kochatgpt_rm_row(row["prompt"], best_first, rng), rng)
    for row in rng.sample(base, 4):  # near duplicates
        best_first = [row[f"completion_{i}"] for i in row["ranking"]]
        best_first[0] = near(best_first[0])
        _insert(rm, kochatgpt_rm_row(row["prompt"], best_first, rng), rng)
    for row in rng.sample(base, 5):  # NFD in place
        for k in row:
            if k == "prompt" or k.startswith("completion_"):
                row[k] = nfd(row[k])
    for it in rng.sample(train, 6):  # an evasive refusal ranked best (as ChatGPT refusals are in KoChatGPT)
        best_first = [fill(rng.choice(EVASIVE), it["subject"], ""), it["completion"], loop(it, rng)]
        _insert(rm, kochatgpt_rm_row(it["prompt"], best_first, rng), rng)
    for it in rng.sample(train, 4):  # an English answer ranked best (a labelling error)
        best_first = [rng.choice(ENGLISH), it["completion"], truncated(it["completion"], rng)]
        _insert(rm, kochatgpt_rm_row(it["prompt"], best_first, rng), rng)
    for it in rng.sample(train, 3):  # a pasted-together, far too long best answer
        same = [o["completion"] for o in train if o["subject"] == it["subject"]]
        best_first = [" ".join(same * 2), it["completion"], loop(it, rng)]
        _insert(rm, kochatgpt_rm_row(it["prompt"], best_first, rng), rng)


def plant_ppo(ppo: list[dict], train: list[dict], rng: random.Random) -> None:
    base = list(ppo)
    for row in rng.sample(base, 6):
        _insert(ppo, dict(row), rng)
    for row in rng.sample(base, 4):
        _insert(ppo, {"prompt": near(row["prompt"], punct=False)}, rng)
    for row in rng.sample(ppo, 4):
        row["prompt"] = nfd(row["prompt"])
    for row in rng.sample(ppo, 3):
        row["prompt"] = messy(row["prompt"])
    for q in ["How do I cook kimchi stew at home?", "What is the best way to save money?",
              "Tell me about the solar system please.", "jeju-do yeohaeng eottae?"]:
        _insert(ppo, {"prompt": q}, rng)
    for it in rng.sample(train, 3):  # far too long prompts: a pasted document before the question
        same = [o["completion"] for o in train if o["subject"] == it["subject"]]
        _insert(ppo, {"prompt": " ".join(same) + " " + it["prompt"]}, rng)


def write(out: Path = OUT, seed: int = SEED) -> dict[str, int]:
    data = build(seed)
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in data.items():
        with open(out / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return {k: len(v) for k, v in data.items()}


if __name__ == "__main__":
    print(write())
