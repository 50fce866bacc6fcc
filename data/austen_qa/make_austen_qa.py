"""Writes data/austen_qa/{train,dev}.json: questions written for this project about five Austen
passages (SQuAD v2.0 format). Run from the repository root: python data/austen_qa/make_austen_qa.py"""
import json
import re

def para(book, n):
    paras = re.split(r"\n\s*\n", open(f"data/austen/{book}.txt", encoding="utf-8").read().strip())
    return " ".join(paras[n - 1].split())

def article(title, context, qas, prefix):
    out = []
    for i, (q, a) in enumerate(qas):
        qa = {"id": f"{prefix}-{i + 1}", "question": q}
        if a is None:
            qa.update(answers=[], is_impossible=True)
        else:
            assert context.count(a) >= 1, a
            qa.update(answers=[{"text": a, "answer_start": context.index(a)}], is_impossible=False)
        out.append(qa)
    return {"title": title, "paragraphs": [{"context": context, "qas": out}]}

pp1 = para("prideprejudice", 4) + " " + para("prideprejudice", 5)
pp13 = para("prideprejudice", 13)
pers = para("persuasion", 6)
emma = para("emma", 5) + " " + para("emma", 6)
ss = para("sensesensibility", 5)

train = {"version": "v2.0", "data": [
    article("Pride and Prejudice, chapter 1", pp1, [
        ("What must a single man in possession of a good fortune be in want of?", "a wife"),
        ("What kind of truth is it?", "universally acknowledged"),
        ("Whose rightful property is the man considered?", "some one or other of their daughters"),
        ("What is the name of the man's horse?", None)], "pp1"),
    article("Pride and Prejudice, chapter 1 (Mrs. Long's news)", pp13, [
        ("Who says that Netherfield is taken?", "Mrs. Long"),
        ("Where does the young man come from?", "the north of England"),
        ("On which day did he come down?", "Monday"),
        ("With whom did he agree immediately?", "Mr. Morris"),
        ("Before which feast is he to take possession?", "Michaelmas"),
        ("How much does the young man pay for Netherfield each year?", None)], "pp13"),
    article("Persuasion, chapter 1", pers, [
        ("Where is Kellynch Hall?", "Somersetshire"),
        ("Which book did Sir Walter Elliot read for his own amusement?", "the Baronetage"),
        ("What did he feel as he turned over the creations of the last century?",
         "pity and contempt"),
        ("What did Sir Walter eat for breakfast?", None)], "pers"),
]}
dev = {"version": "v2.0", "data": [
    article("Emma, chapter 1", emma, [
        ("How long had Emma lived in the world?", "nearly twenty-one years"),
        ("What was Emma's surname?", "Woodhouse"),
        ("Who had died too long ago for Emma to remember her well?", "Her mother"),
        ("Who supplied the mother's place?", "an excellent woman as governess"),
        ("What colour was Emma's hair?", None)], "emma"),
    article("Sense and Sensibility, chapter 1", ss, [
        ("Where had the family of Dashwood long been settled?", "Sussex"),
        ("What was the name of their residence?", "Norland Park"),
        ("How many years before the old owner did his sister die?", "ten years"),
        ("Whom did the owner invite into his house?", "the family of his nephew Mr. Henry Dashwood"),
        ("How many servants worked at Norland?", None)], "ss"),
]}
for name, doc in (("train", train), ("dev", dev)):
    with open(f"data/austen_qa/{name}.json", "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1, ensure_ascii=False)
        f.write("\n")
