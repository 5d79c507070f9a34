#!/usr/bin/env python3
"""Writes whet's two example datasets under data/ (written for whet; synthetic, seeded, so the
files are reproducible from this script):

  data/support-style/  a support assistant for a fictional outdoor-gear shop that must always
                       answer in one house style: the greeting "Hi there!", two or three "- "
                       bullet points, and the sign-off "— Fjord Outfitters Support", under 60 words.
  data/intents/        customer messages labelled with one of eight intents; the answer is the
                       label alone.

    python3 scripts/make_example_data.py
"""
import json
import pathlib
import random

ROOT = pathlib.Path(__file__).resolve().parent.parent / "data"
SIGN_OFF = "— Fjord Outfitters Support"

ITEMS = ["hiking boots", "rain jacket", "down sleeping bag", "two-person tent", "trail backpack",
         "fleece pullover", "trekking poles", "camp stove", "insulated bottle", "wool socks",
         "headlamp", "climbing harness"]
ORDER = lambda r: f"FJ-{r.randint(10000, 99999)}"

SUPPORT = {
    "order_status": (
        ["Where is my order {order}? I ordered {item} last week.",
         "My {item} (order {order}) still hasn't arrived. Any news?",
         "Can you check the status of order {order} please?",
         "I'm waiting on {item}, order number {order}. When will it come?"],
        ["Your order {order} has shipped and is on its way.",
         "Tracking updates can lag by up to 24 hours.",
         "If it has not arrived in 5 working days, reply and we will trace it."]),
    "return": (
        ["How do I return my {item}?",
         "The {item} doesn't fit. Can I send it back?",
         "I want to return {item} from order {order}.",
         "Is it possible to return {item} I bought two weeks ago?"],
        ["You can return unused items within 30 days.",
         "Start the return from Orders > {order_or_account} and print the free label.",
         "Refunds reach your card 3-5 days after we receive the parcel."]),
    "sizing": (
        ["What size {item} should I get? I'm usually a medium.",
         "Do your {item} run small or large?",
         "I'm between sizes for the {item}. Which one?",
         "How does the sizing of the {item} compare to other brands?"],
        ["Our {item} fit true to size.",
         "Between sizes, choose the larger one for layering.",
         "Free exchanges apply if the size is wrong."]),
    "warranty": (
        ["My {item} broke after three months. Is it covered?",
         "The zip on my {item} failed. What can you do?",
         "Does the {item} have a warranty?",
         "A seam on my {item} came apart. Can it be repaired?"],
        ["All our gear carries a 2-year warranty against defects.",
         "Send a photo of the fault with your order number.",
         "We repair or replace it free of charge."]),
    "shipping": (
        ["Do you ship {item} to Norway?",
         "How long does delivery to Canada take?",
         "Can I get express shipping on a {item}?",
         "What does shipping cost for a {item}?"],
        ["We ship to 30 countries, Norway and Canada included.",
         "Standard delivery takes 3-7 working days; express takes 1-2.",
         "Shipping is free on orders over 80 euros."]),
    "payment": (
        ["Can I pay for the {item} with PayPal?",
         "My card was declined when buying {item}. Why?",
         "Do you take payment in instalments?",
         "Was I charged twice for order {order}?"],
        ["We accept cards, PayPal and Klarna instalments.",
         "Declines usually come from the bank's security check; try again or use PayPal.",
         "Duplicate holds on order {order} drop off within 3 days."]),
    "care": (
        ["How do I wash my {item}?",
         "Can the {item} go in the dryer?",
         "How should I store my {item} over winter?",
         "What's the best way to clean a muddy {item}?"],
        ["Wash the {item} cold with a mild technical detergent.",
         "Air-dry it away from direct heat.",
         "Store it clean, dry and loosely packed."]),
}

GREETINGS_USER = ["", "Hello! ", "Hi, ", "Good morning. ", "Hey there, "]


def support_example(r, topic):
    questions, facts = SUPPORT[topic]
    item, order = r.choice(ITEMS), ORDER(r)
    q = r.choice(GREETINGS_USER) + r.choice(questions).format(item=item, order=order)
    n = r.choice([2, 3])
    bullets = [f.format(item=item, order=order, order_or_account=order) for f in facts[:n]]
    answer = "Hi there!\n" + "\n".join(f"- {b}" for b in bullets) + f"\n{SIGN_OFF}"
    assert len(answer.split()) < 60, answer
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": answer}]}


INTENTS = {
    "order_status": ["where is my package {order}", "has order {order} shipped yet?",
                     "my {item} hasn't arrived", "tracking for {order} hasn't moved in days",
                     "when will my {item} be delivered?"],
    "refund": ["I want my money back for the {item}", "please refund order {order}",
               "still waiting for the refund on my {item}", "how long do refunds take?",
               "I returned the {item}, where is my refund?"],
    "cancel_order": ["cancel order {order} please", "I ordered the wrong {item}, cancel it",
                     "can I still cancel {order}?", "stop my order, I changed my mind",
                     "please don't ship the {item}, I want to cancel"],
    "change_address": ["I need to change the delivery address for {order}",
                       "wrong address on my order, can you fix it?",
                       "ship the {item} to my office instead", "I moved, update the address on {order}",
                       "can you redirect {order} to a new address?"],
    "product_question": ["is the {item} waterproof?", "what is the {item} made of?",
                         "how heavy is the {item}?", "is the {item} good for winter camping?",
                         "does the {item} come in blue?"],
    "complaint": ["the {item} arrived damaged and I'm furious", "your courier was rude",
                  "terrible service, nobody answers my emails", "the {item} smells awful",
                  "I've been on hold for an hour, this is unacceptable"],
    "account_access": ["I can't log in to my account", "password reset email never arrives",
                       "my account is locked", "how do I change my email address on my account?",
                       "two-factor code isn't working"],
    "other": ["do you have a shop in Oslo?", "are you hiring?", "what are your opening hours?",
              "do you sponsor hiking clubs?", "can I buy a gift card?"],
}
PREFIX = ["", "hi, ", "hello ", "quick question: ", "urgent: ", "excuse me, "]
SUFFIX = ["", " thanks", " please", "!", " ??", " - thank you"]


def intent_example(r, label):
    text = r.choice(PREFIX) + r.choice(INTENTS[label]).format(item=r.choice(ITEMS), order=ORDER(r)) + r.choice(SUFFIX)
    return {"messages": [{"role": "user", "content": text}, {"role": "assistant", "content": label}]}


def intent_groups(r, labels, per_label, size):
    """Paraphrase groups for the test set: one request (intent, item, order) asked `size`
    ways — different templates of the intent, greetings and endings — sharing a `group` id, so
    that `whet compare` measures whether the answers agree across paraphrases."""
    rows = []
    for label in labels:
        for k in range(per_label):
            item, order = r.choice(ITEMS), ORDER(r)
            for template in r.sample(INTENTS[label], size):
                text = r.choice(PREFIX) + template.format(item=item, order=order) + r.choice(SUFFIX)
                rows.append({"messages": [{"role": "user", "content": text},
                                          {"role": "assistant", "content": label}],
                             "group": f"{label}-{k}"})
    r.shuffle(rows)
    return rows


def write(name, splits, readme):
    d = ROOT / name
    d.mkdir(parents=True, exist_ok=True)
    for split, rows in splits.items():
        with open(d / f"{split}.jsonl", "w") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    (d / "README.md").write_text(readme)


def main():
    r = random.Random(20261124)
    topics = list(SUPPORT)
    support = {s: [support_example(r, topics[i % len(topics)]) for i in range(n)]
               for s, n in [("train", 140), ("valid", 21), ("test", 21)]}
    write("support-style", support,
          "# support-style (written for whet; synthetic, from scripts/make_example_data.py)\n\n"
          "Customer questions to a fictional outdoor-gear shop, answered in one fixed house style:\n"
          "the greeting `Hi there!`, two or three `- ` bullet points, and the sign-off\n"
          f"`{SIGN_OFF}`, under 60 words. A prompt can state this rule; a 135M model\n"
          "follows it unreliably. Fine-tuning teaches it.\n")
    labels = list(INTENTS)
    intents = {s: [intent_example(r, labels[i % len(labels)]) for i in range(n)]
               for s, n in [("train", 240), ("valid", 40), ("test", 40)]}
    for rows in intents.values():
        r.shuffle(rows)
    # The test set: paraphrase groups, from a generator of its own so train and valid stay as
    # they were.
    intents["test"] = intent_groups(random.Random(20261201), labels, per_label=2, size=3)
    write("intents", intents,
          "# intents (written for whet; synthetic, from scripts/make_example_data.py)\n\n"
          "Short customer messages, each labelled with one of eight intents: "
          + ", ".join(f"`{l}`" for l in labels) + ".\n"
          "The assistant answers with the label alone. The test set is 16 paraphrase groups of\n"
          "three (field `group`): one request asked three ways, so `whet compare` reports how\n"
          "often each arm answers a group alike.\n")


if __name__ == "__main__":
    main()
