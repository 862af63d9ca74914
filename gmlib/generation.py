"""Generation: the article's two prompts, every model side by side, fixed sampling and seed.
"""
# The article's two generation prompts (the "Контекст:" lines of the Habr article, 2021).
PROMPT_METHANOL = ("Также ученые сообщили об обнаружении метанола в отдаленных от центра Млечного Пути "
                   "молекулярных облаках. По словам исследователей, их открытие ставит под сомнение")
PROMPT_SWEETS = ("Я огляделась по сторонам и увидела женщину, торопливо уводящую нескольких детей подальше "
                 "от двух наших групп. Она тоже оглянулась, перевела взгляд на нас и приказала своим отпрыскам "
                 "поторапливаться. Младший захныкал, пытаясь задержать ее у витрины со сладостями")
PROMPTS = {"methanol": PROMPT_METHANOL, "sweets": PROMPT_SWEETS}


def generate_texts(models: dict, tokenizer, prompts: dict = PROMPTS, max_new_tokens: int = 60,
                   temperature: float = 0.8, top_p: float = 0.9, seed: int = 0) -> dict:
    """{prompt name: {model name: continuation}}; generation stops early at a bos (a new document).
    Each model continues all prompts in one batched call, each prompt with the same seed."""
    bos = tokenizer.bos_id()
    encoded = [[bos] + list(tokenizer.encode(text)) for text in prompts.values()]
    out = {pname: {} for pname in prompts}
    for name, lm in models.items():
        got = lm.generate_many(encoded, max_new_tokens, temperature=temperature, top_p=top_p, seed=seed, stop_token=bos)
        for pname, toks in zip(prompts, got):
            out[pname][name] = tokenizer.decode([t for t in toks if t != bos])
    return out


def generations_markdown(texts: dict, prompts: dict = PROMPTS, params: dict | None = None) -> str:
    lines = ["# Generated continuations", ""]
    if params:
        lines += ["Sampling: " + ", ".join(f"{k}={v}" for k, v in params.items()), ""]
    for pname, by_model in texts.items():
        lines += [f"## {pname}", "", f"**Контекст:** {prompts[pname]}", ""]
        for name, cont in by_model.items():
            one_line = " ".join(cont.split())  # keep each continuation on one Markdown line
            lines += [f"- **{name}:** …{one_line}", ""]
    return "\n".join(lines)
