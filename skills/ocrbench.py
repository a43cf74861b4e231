"""OCRBench Level-2 skills (reached through the OCRBench router, some also directly callable).

One solve serves all five children; the child's name picks its row below, and only the evidence
that row lists is computed.
"""

from skills import Task, solve_task, task_for

LAST_LINE = "Do not explain; the final line must be only the answer."

TASKS = {
    "text_recognition": Task(
        "reading the main text in the image",
        ("ocr",), "the main text string, with ambiguous glyphs such as O/0, I/1, S/5, B/8",
        ("Transcribe character by character exactly as written; keep case, digits and punctuation.",
         "Where OCR and image disagree on a glyph, follow the image.", LAST_LINE)),
    "key_information_extraction": Task(
        "extracting a field from a receipt, form or label",
        ("ocr", "detection"), "the field the question asks for and its value",
        ("Find the field the question names, and give its value, not the field name.",
         "Keep units, currency symbols and number formatting as printed.", LAST_LINE)),
    "scene_text_qa": Task(
        "answering a question about text in a natural scene",
        ("ocr", "caption", "detection"), "the object named in the question and the text on it",
        ("First find the object the question refers to, then read the text on it; ignore other text.",
         LAST_LINE)),
    "document_chart_qa": Task(
        "answering a question about a document, table or chart",
        ("ocr", "caption"), "",
        ("Decide whether it is a page, a table or a chart, and use its layout (headers, rows, axes, legend) "
         "together with the OCR text.", LAST_LINE)),
    "formula_recognition": Task(
        "transcribing a (possibly handwritten) formula",
        ("ocr",), "",
        ("Recover the two-dimensional structure: fractions, exponents, subscripts, roots.",
         "Output the formula in LaTeX only.", LAST_LINE)),
}


def solve(ctx):
    return solve_task(ctx, "OCRBench", task_for(ctx, "OCRBench", TASKS))
