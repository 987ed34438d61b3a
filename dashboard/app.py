"""keras-ham dashboard: classify uploaded lesion images, explain them with Grad-CAM, and
inspect training runs. For research and education only; not a medical device.

    panel serve dashboard/app.py [--port 5006] [--args --model PATH --runs DIR]

The model is the newest runs/*/best.keras unless `--model` or KERAS_HAM_MODEL names one;
the runs folder is `--runs`, KERAS_HAM_RUNS or ./runs. Models are loaded once per server
process and shared; everything a user uploads lives in that browser session only (the page
is built per session by `create_app`). Uploads are sent in 4 MB chunks and limited to
20 MB per file, so Bokeh's 20 MB websocket message limit is never reached.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import logging
import sys
from functools import partial
from pathlib import Path

import panel as pn

from keras_ham.device import configure_device  # noqa: E402

# Before anything imports keras. `panel serve` runs this file once per session, so the choice
# is kept in the process-wide cache (a second call would only see its own KERAS_TORCH_DEVICE).
if "keras_ham.device" not in pn.state.cache:
    pn.state.cache["keras_ham.device"] = configure_device("auto", log=None)
DEVICE = pn.state.cache["keras_ham.device"]

import keras  # noqa: E402
import param  # noqa: E402

from keras_ham import dashboard_logic as logic  # noqa: E402
from keras_ham import runs as run_layout  # noqa: E402
from keras_ham.errors import KerasHamError  # noqa: E402
from keras_ham.internals import drop_panel_fast_theme_fonts  # noqa: E402
from keras_ham.server_log import quiet_client_disconnects  # noqa: E402

LOG = logging.getLogger("keras_ham.dashboard")

TITLE = "keras-ham · skin-lesion classifier"
ACCENT = "#1f5f8b"
CARD_WIDTH = 440
IMAGE_WIDTH = 204
DISCLAIMER = (
    "<b>Research and education only.</b> keras-ham is not a medical device and must not be used "
    "for diagnosis or treatment decisions. Predictions can be wrong; any concerning skin lesion "
    "needs a clinician."
)

CSS = """
:host { font-family: inherit; }
.kh-class { font-size: 1.35em; font-weight: 700; color: #17324d; letter-spacing: .02em; }
.kh-full { font-weight: 600; color: #17324d; margin-top: 2px; }
.kh-desc { color: #4a5a6a; font-size: .9em; margin: 2px 0 6px; }
.kh-badge { display: inline-block; padding: 1px 8px; border-radius: 10px; font-size: .85em;
            font-weight: 600; margin-left: 8px; vertical-align: middle; }
.kh-sure { background: #e3f1e6; color: #1d6b32; }
.kh-unsure { background: #fff1d6; color: #8a5300; }
.kh-alt { background: #fff8e8; border-left: 3px solid #e0a100; padding: 4px 8px; margin: 4px 0 6px;
          font-size: .88em; color: #5a4300; }
.kh-bars { width: 100%; border-collapse: collapse; font-size: .85em; }
.kh-bars td { padding: 1px 4px; white-space: nowrap; }
.kh-track { position: relative; width: 100%; height: 12px; background: #eef1f4; border-radius: 3px; }
.kh-fill { height: 12px; background: #9db4c8; border-radius: 3px; }
.kh-fill.kh-top { background: #1f5f8b; }
.kh-mark { position: absolute; top: -2px; height: 16px; border-left: 2px dashed #e0a100; }
.kh-note { color: #5b6b7b; font-size: .82em; }
.kh-scale { margin-left: 8px; white-space: nowrap; }
.kh-scale i { display: inline-block; width: 36px; height: 8px; vertical-align: middle; border-radius: 2px;
              background: linear-gradient(90deg, #00007f, #0000ff, #00ffff, #7fff7f, #ffff00, #ff0000, #7f0000); }
.kh-error-title { font-weight: 700; color: #8b1d1d; }
.kh-error-msg { color: #5e1a1a; font-size: .9em; word-break: break-word; }
.kh-table { border-collapse: collapse; font-size: .88em; }
.kh-table th, .kh-table td { padding: 3px 8px; border-bottom: 1px solid #e3e7eb; text-align: right; }
.kh-table th:first-child, .kh-table td:first-child { text-align: left; }
.kh-cm td { text-align: center; min-width: 38px; }
.kh-stats { display: flex; gap: 12px; flex-wrap: wrap; }
.kh-stat { background: #f4f7fa; border-radius: 6px; padding: 6px 12px; min-width: 110px; }
.kh-stat b { display: block; font-size: 1.3em; color: #17324d; }
.kh-ci { display: block; font-size: .62em; font-weight: 400; color: #5b6b7b; }
.kh-pre { background: #f6f8fa; padding: 8px; border-radius: 6px; font-size: .82em; max-height: 420px;
          overflow: auto; margin: 0; }
.kh-demo { background: #8b1d1d; color: white; font-weight: 700; border-radius: 6px; padding: 6px 10px;
           margin: 4px 0 6px; }
.kh-disclaimer { background: #fff4e5; border: 1px solid #f0c36d; border-radius: 6px; padding: 8px 12px;
                 color: #5c3b00; }
"""
CARD_STYLES = {
    "background": "white",
    "border-radius": "8px",
    "box-shadow": "0 1px 4px rgba(16, 38, 60, .18)",
    "padding": "8px 10px",
}


def _html(text: str, **params) -> pn.pane.HTML:
    return pn.pane.HTML(text, stylesheets=[CSS], **params)


def _percent(value: float) -> str:
    return f"{100 * value:.1f}\u00a0%"


# --------------------------------------------------------------------------- upload


class ImageUpload(pn.custom.JSComponent):
    """Drop zone and file picker that sends each file to the server in chunks.

    Why not pn.widgets.FileInput: it sends all files base64-encoded in one websocket message,
    and one over Bokeh's 20 MB message limit closes the session. Why not FileDropper: FilePond
    holds every local file for a fixed ~1 s "perceived" load before sending it and shows a
    large preview per file. Here each file goes as binary chunks of `chunk_bytes` the moment
    it is chosen; files over `max_bytes` are refused in the browser (and again on the server).
    `on_file(name, data, size)` is awaited with the bytes, or with None for a refused file.
    """

    accept = param.String(default=",".join(logic.ACCEPTED_EXTENSIONS))
    max_bytes = param.Integer(default=logic.MAX_UPLOAD_BYTES)
    chunk_bytes = param.Integer(default=4_000_000)
    disabled = param.Boolean(default=False)

    _esm = """
    export function render({ model, el }) {
      const zone = document.createElement("label");
      zone.className = "zone";
      const input = document.createElement("input");
      input.type = "file"; input.multiple = true; input.accept = model.accept;
      const title = document.createElement("div");
      title.className = "title";
      title.innerHTML = "Drop images here or <u>browse</u>";
      const note = document.createElement("div");
      note.className = "note";
      zone.append(input, title, note);
      let next = 0;
      const show = () => {
        zone.classList.toggle("disabled", model.disabled);
        input.disabled = model.disabled;
      };
      async function send(files) {
        for (const file of files) {
          note.textContent = `sending ${file.name}`;
          const id = `${Date.now()}-${next++}`;
          if (file.size > model.max_bytes) {
            model.send_msg({kind: "refused", id, name: file.name, size: file.size});
            continue;
          }
          const total = Math.max(1, Math.ceil(file.size / model.chunk_bytes));
          for (let index = 0; index < total; index++) {
            const start = index * model.chunk_bytes;
            const data = await file.slice(start, Math.min(file.size, start + model.chunk_bytes)).arrayBuffer();
            model.send_msg({kind: "chunk", id, name: file.name, size: file.size, index, total, data});
          }
        }
        input.value = "";
        note.textContent = "";
      }
      input.addEventListener("change", () => send([...input.files]));
      zone.addEventListener("dragover", (event) => { event.preventDefault(); zone.classList.add("over"); });
      zone.addEventListener("dragleave", () => zone.classList.remove("over"));
      zone.addEventListener("drop", (event) => {
        event.preventDefault(); zone.classList.remove("over");
        if (!model.disabled) send([...event.dataTransfer.files]);
      });
      model.on("disabled", show);
      show();
      el.append(zone);
    }
    """

    _stylesheets = ["""
    .zone { display: block; border: 2px dashed #9fb3c8; border-radius: 8px; padding: 18px 10px;
            text-align: center; cursor: pointer; background: #f7fafc; color: #17324d; }
    .zone.over { border-color: #1f5f8b; background: #e6f0f8; }
    .zone.disabled { opacity: .5; cursor: not-allowed; }
    .zone input { display: none; }
    .title { font-weight: 600; }
    .note { font-size: .8em; color: #5b6b7b; margin-top: 4px; min-height: 1em; }
    """]

    def __init__(self, on_file, **params):
        super().__init__(**params)
        self._on_file = on_file
        self._parts: dict[str, list[bytes]] = {}
        self._refused: set[str] = set()

    def _handle_msg(self, msg) -> None:
        """Collect one chunk; hand a complete (or refused) file to `on_file` as a task."""
        upload_id, name = str(msg.get("id")), str(msg.get("name") or "unnamed")
        if upload_id in self._refused:
            return
        if msg.get("kind") == "refused":
            pn.state.execute(partial(self._on_file, name, None, int(msg.get("size") or 0)))
            return
        data = msg.get("data") or b""
        parts = self._parts.setdefault(upload_id, [])
        parts.append(data.encode("utf-8") if isinstance(data, str) else bytes(data))
        received = sum(len(part) for part in parts)
        if received > self.max_bytes:  # the browser checks the size too, but is not trusted
            del self._parts[upload_id]
            self._refused.add(upload_id)
            pn.state.execute(partial(self._on_file, name, None, received))
            return
        if int(msg.get("index", 0)) + 1 >= int(msg.get("total", 1)):
            data = b"".join(self._parts.pop(upload_id))
            pn.state.execute(partial(self._on_file, name, data, len(data)))


# --------------------------------------------------------------------------- cards


def prediction_html(card: logic.ImageCard, threshold: float) -> str:
    """Predicted class, its full name and description, uncertainty note, probability bars."""
    bundle = card.bundle
    name = card.predicted_name
    uncertain = card.is_uncertain(threshold)
    badge = (
        f'<span class="kh-badge kh-unsure">uncertain · {_percent(card.confidence)}</span>'
        if uncertain
        else f'<span class="kh-badge kh-sure">{_percent(card.confidence)}</span>'
    )
    parts = [f'<div class="kh-demo">{html.escape(logic.DEMO_NOTICE)}</div>'] if bundle.training_data.is_demo else []
    parts += [
        f'<div><span class="kh-class">{html.escape(name)}</span>{badge}</div>',
        f'<div class="kh-full">{html.escape(bundle.full_names[name])}</div>',
        f'<div class="kh-desc">{html.escape(bundle.descriptions[name])}</div>',
    ]
    if uncertain:
        alternatives = ", ".join(f"<b>{html.escape(c)}</b> {_percent(p)}" for c, p in card.top(logic.TOP_K))
        parts.append(
            f'<div class="kh-alt">Top probability is below the {_percent(threshold)} threshold. '
            f"Top {logic.TOP_K}: {alternatives}</div>"
        )
    rows = []
    for index, (class_name, probability) in enumerate(zip(card.class_names, card.probabilities)):
        top = " kh-top" if index == card.predicted_index else ""
        rows.append(
            f'<tr><td title="{html.escape(bundle.full_names[class_name])}">{html.escape(class_name)}</td>'
            f'<td style="width:100%"><div class="kh-track"><div class="kh-fill{top}" '
            f'style="width:{100 * float(probability):.1f}%"></div>'
            f'<div class="kh-mark" style="left:{100 * threshold:.1f}%"></div></div></td>'
            f'<td style="text-align:right">{_percent(float(probability))}</td></tr>'
        )
    parts.append(f'<table class="kh-bars">{"".join(rows)}</table>')
    parts.append(f'<div class="kh-note kh-calibration">{html.escape(calibration_note(bundle))}</div>')
    if card.unfamiliar:
        parts.append(f'<div class="kh-alt kh-ood">Unlike the images this model was trained on: '
                     f'{html.escape(logic.ood_score_name(bundle.ood))} '
                     f'{card.ood_score:.2f} is above {bundle.ood["threshold"]:.2f}, which '
                     f'{100 * bundle.ood["false_alarm_rate"]:.0f}\u00a0% of validation images exceed. '
                     "Do not trust this prediction.</div>")
    for note in card.notes:
        parts.append(f'<div class="kh-note">{html.escape(note)}</div>')
    return "".join(parts)


def calibration_note(bundle: logic.ModelBundle) -> str:
    if bundle.temperature is None and bundle.calibration_skipped:
        return (f"Probabilities: the model's softmax, not calibrated: temperature scaling was skipped "
                f"({bundle.calibration_skipped}).")
    if bundle.temperature is None:
        return "Probabilities: the model's softmax, not calibrated (no temperature in this model)."
    return (f"Probabilities calibrated by temperature scaling (T = {bundle.temperature:.3f}, fitted on the "
            "validation split).")


class CardView:
    """The widgets of one ImageCard: images, prediction, Grad-CAM class, layer and opacity."""

    def __init__(self, card: logic.ImageCard, threshold: float, on_remove):
        self.card = card
        names = card.class_names
        options = {f"{name} ({'predicted' if i == card.predicted_index else _percent(float(card.probabilities[i]))})": i
                   for i, name in enumerate(names)}
        self.class_select = pn.widgets.Select(label="Explain class", options=options, value=card.predicted_index,
                                              width=200, margin=(0, 8, 0, 0), css_classes=["kh-class-select"])
        layers = {f"{name} · {h}×{w}" + (" (default)" if name == card.bundle.default_layer else ""): name
                  for name, (h, w) in card.bundle.layer_choices}
        self.layer_select = pn.widgets.Select(
            label="Grad-CAM layer", options=layers, value=card.bundle.default_layer, width=CARD_WIDTH - 32,
            margin=(4, 8, 0, 0),
            css_classes=["kh-layer-select"],
            description="Deeper layers are more class-specific but coarser; cards open at the deepest one "
                        f"with at least {logic.MIN_DISPLAY_CAM_CELLS}×{logic.MIN_DISPLAY_CAM_CELLS} cells.")
        self.opacity = pn.widgets.FloatSlider(label="Grad-CAM opacity", start=0.0, end=1.0, step=0.05,
                                              value=logic.DEFAULT_OPACITY, width=190, margin=(0, 0, 0, 8))
        self.original = pn.pane.PNG(logic.encode_png(card.image), width=IMAGE_WIDTH, alt_text="uploaded image",
                                    css_classes=["kh-original"], margin=(0, 4))
        self.gradcam = pn.pane.PNG(logic.encode_png(card.overlay(None, logic.DEFAULT_OPACITY)), width=IMAGE_WIDTH,
                                   alt_text="Grad-CAM overlay", css_classes=["kh-gradcam"], margin=(0, 4))
        self.captions = _html(self._captions_html(), margin=(0, 4))
        self.prediction = _html(prediction_html(card, threshold), css_classes=["kh-prediction"],
                                sizing_mode="stretch_width")
        remove = pn.widgets.Button(label="✕", color="light", width=36, height=30, margin=0,
                                   description="Remove this card", css_classes=["kh-remove"])
        remove.on_click(lambda _event: on_remove(card.card_id))
        self.class_select.param.watch(self._on_explain, "value")
        self.layer_select.param.watch(self._on_explain, "value")
        self.opacity.param.watch(self._on_opacity, "value")
        header = pn.Row(
            _html(f'<b title="{html.escape(card.filename)}">{html.escape(_short(card.filename))}</b>'
                  f' <span class="kh-note">· {html.escape(card.bundle.path.parent.name)}</span>',
                  sizing_mode="stretch_width", margin=(4, 4)),
            remove, sizing_mode="stretch_width",
        )
        self.panel = pn.Column(
            header,
            pn.Row(self.original, self.gradcam),
            self.captions,
            self.prediction,
            pn.Row(self.class_select, self.opacity),
            self.layer_select,
            width=CARD_WIDTH, styles=CARD_STYLES, css_classes=["kh-card"], margin=8,
        )

    def _captions_html(self) -> str:
        explained = self.card.class_names[self.class_select.value]
        layer = self.layer_select.value
        where = "" if layer == self.card.bundle.default_layer else f" at {html.escape(layer)}"
        return (f'<div class="kh-note kh-caption" style="display:flex">'
                f'<span style="width:{IMAGE_WIDTH + 8}px">image</span>'
                f"<span>Grad-CAM: <b>{html.escape(explained)}</b>{where}"
                '<span class="kh-scale" title="blue: little evidence for the class, red: the strongest">'
                "low <i></i> high</span></span></div>")

    def set_threshold(self, threshold: float) -> None:
        self.prediction.object = prediction_html(self.card, threshold)

    def _chosen(self) -> tuple[int, str]:
        return self.class_select.value, self.layer_select.value

    def _render_overlay(self) -> None:
        index, layer = self._chosen()
        if self.card.heatmap_key(index, layer) not in self.card.heatmaps:  # being computed; that callback redraws
            return
        self.gradcam.object = logic.encode_png(self.card.overlay(index, self.opacity.value, layer))
        self.captions.object = self._captions_html()

    def _on_opacity(self, _event) -> None:
        self._render_overlay()  # re-blends the cached map: no model call

    async def _on_explain(self, _event) -> None:
        chosen = self._chosen()
        if self.card.heatmap_key(*chosen) not in self.card.heatmaps:
            self.gradcam.loading = True
            try:
                await asyncio.to_thread(self.card.heatmap, *chosen)
            finally:
                self.gradcam.loading = False
            if self._chosen() != chosen:  # a newer choice will draw itself
                return
        self._render_overlay()


def _short(name: str, limit: int = 38) -> str:
    return name if len(name) <= limit else name[: limit - 12] + "…" + name[-11:]


def error_card_panel(card: logic.ErrorCard, on_remove) -> pn.Column:
    remove = pn.widgets.Button(label="✕", color="light", width=36, height=30, margin=0,
                               description="Remove this message", css_classes=["kh-remove"])
    remove.on_click(lambda _event: on_remove(card.card_id))
    body = _html(
        f'<div class="kh-error-title">Could not analyse {html.escape(_short(card.filename))}</div>'
        f'<div class="kh-error-msg">{html.escape(card.message)}</div>',
        sizing_mode="stretch_width", css_classes=["kh-error"],
    )
    return pn.Column(pn.Row(body, remove, sizing_mode="stretch_width"), width=CARD_WIDTH, margin=8,
                     styles={**CARD_STYLES, "border-left": "4px solid #c0392b"}, css_classes=["kh-error-card"])


def placeholder_panel(filename: str) -> pn.Column:
    return pn.Column(
        pn.Row(pn.indicators.LoadingSpinner(value=True, size=24, margin=(4, 8)),
               _html(f"Analysing <b>{html.escape(_short(filename))}</b>…", margin=(6, 4))),
        width=CARD_WIDTH, margin=8, styles=CARD_STYLES, css_classes=["kh-pending"],
    )


# --------------------------------------------------------------------------- run tab


def _stat(label: str, value, interval=None, level: float = 0.95) -> str:
    text = f"{value:.3f}" if isinstance(value, float) else html.escape(str(value))
    if isinstance(interval, (list, tuple)) and len(interval) == 2:
        text += (f'<span class="kh-ci" title="{level:.0%} bootstrap interval">'
                 f"{level:.0%} CI {interval[0]:.3f}–{interval[1]:.3f}</span>")
    return f'<div class="kh-stat">{html.escape(label)}<b>{text}</b></div>'


PER_CLASS_COLUMNS = ("precision", "recall", "f1", "roc_auc_ovr", "support")


def metrics_html(report: logic.RunReport) -> str:
    metrics = report.metrics or {}
    names = metrics.get("class_names") or []
    intervals = metrics.get("confidence_intervals") if isinstance(metrics.get("confidence_intervals"), dict) else {}
    stats = [
        _stat(label, metrics[key], intervals.get(key), intervals.get("level", 0.95)) for key, label in (
            ("balanced_accuracy", "balanced accuracy"), ("accuracy", "accuracy"), ("macro_f1", "macro F1"),
            ("weighted_f1", "weighted F1"), ("macro_roc_auc_ovr", "macro ROC AUC"), ("num_images", "images"),
        ) if metrics.get(key) is not None
    ]
    per_class = metrics.get("per_class") or {}
    rows = "".join(
        f"<tr><td>{html.escape(name)}</td>"
        + "".join(f"<td>{_fmt(values.get(key))}</td>" for key in PER_CLASS_COLUMNS)
        + "</tr>"
        for name, values in per_class.items() if isinstance(values, dict)
    )
    per_class_table = (
        '<table class="kh-table"><tr><th>class</th><th>precision</th><th>recall</th><th>F1</th>'
        f"<th>ROC AUC</th><th>support</th></tr>{rows}</table>" if rows else "<i>no per-class metrics</i>"
    )
    matrix = metrics.get("confusion_matrix")
    if matrix and names and len(matrix) == len(names):
        shares = logic.row_normalised(matrix)
        head = "".join(f"<th>{html.escape(n)}</th>" for n in names)
        body = "".join(
            f"<tr><th>{html.escape(names[i])}</th>" + "".join(
                f'<td style="background: rgba(31, 95, 139, {shares[i][j]:.3f}); '
                f'color: {"white" if shares[i][j] > 0.5 else "#17324d"}" '
                f'title="true {html.escape(names[i])}, predicted {html.escape(names[j])}: '
                f'{100 * shares[i][j]:.1f} % of the row">'
                f"{int(count)}</td>" for j, count in enumerate(row)) + "</tr>"
            for i, row in enumerate(matrix)
        )
        confusion = (f'<table class="kh-table kh-cm"><tr><th>true \\ predicted</th>{head}</tr>{body}</table>'
                     '<div class="kh-note">colour: share of the true class (row)</div>')
    else:
        confusion = "<i>no confusion matrix</i>"
    return (
        f'<h3 style="margin:4px 0">Evaluation: {html.escape(report.evaluation_name or "")}</h3>'
        f'<div class="kh-stats">{"".join(stats)}</div>'
        '<div style="display:flex; gap:32px; flex-wrap:wrap; margin-top:12px">'
        f"<div><h4 style='margin:4px 0'>Confusion matrix</h4>{confusion}</div>"
        f"<div><h4 style='margin:4px 0'>Per class</h4>{per_class_table}</div></div>"
    )


def _fmt(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.3f}"
    return html.escape(str(value))


def summary_html(summary: dict | None) -> str:
    if not summary:
        return "<i>no summary.json</i>"
    rows = "".join(
        f"<tr><td>{html.escape(str(key))}</td><td>{_fmt(value)}</td></tr>"
        for key, value in summary.items() if not isinstance(value, (dict, list))
    )
    return f'<h4 style="margin:4px 0">Summary</h4><table class="kh-table">{rows}</table>'


def history_figures(report: logic.RunReport) -> list:
    from bokeh.models import AdaptiveTicker, HoverTool
    from bokeh.plotting import figure

    figures = []
    for metric, title in (("loss", "Loss"), ("accuracy", "Accuracy"), ("balanced_accuracy", "Balanced accuracy")):
        series = logic.history_series(report.history, metric)
        if not series:
            continue
        plot = figure(title=title, height=260, sizing_mode="stretch_width", x_axis_label="epoch",
                      tools="pan,wheel_zoom,box_zoom,reset,save", toolbar_location="right")
        plot.toolbar.autohide = True
        plot.xaxis.ticker = AdaptiveTicker(min_interval=1, desired_num_ticks=8)  # whole epochs
        for column, epochs, values in series:
            colour, label = ("#e07b00", "validation") if column.startswith("val_") else (ACCENT, "train")
            plot.line(epochs, values, line_width=2, color=colour, legend_label=label)
            plot.scatter(epochs, values, size=5, color=colour, legend_label=label)
        plot.add_tools(HoverTool(tooltips=[("epoch", "@x{0}"), (title, "@y{0.000}")]))
        plot.legend.location = "top_right" if metric == "loss" else "bottom_right"
        plot.legend.click_policy = "hide"
        figures.append(pn.pane.Bokeh(plot, sizing_mode="stretch_width", min_width=260))
    return figures


def run_report_panel(run_dir: Path) -> pn.Column:
    report = logic.load_run_report(run_dir)
    items: list = [_html(f'<h2 style="margin:4px 0">Run {html.escape(report.name)}</h2>'
                         f'<div class="kh-note">{html.escape(str(report.run_dir))}</div>')]
    figures = history_figures(report)
    if figures:
        items.append(pn.Row(*figures, sizing_mode="stretch_width"))
    if report.metrics:
        items.append(_html(metrics_html(report), sizing_mode="stretch_width"))
    items.append(pn.Row(
        _html(summary_html(report.summary), width=420),
        _html('<h4 style="margin:4px 0">Config (config.yaml)</h4>'
              f'<pre class="kh-pre">{html.escape(report.config_text or "no config.yaml")}</pre>',
              sizing_mode="stretch_width"),
        sizing_mode="stretch_width",
    ))
    if report.problems:
        items.append(pn.pane.Alert("\n".join(f"- {p}" for p in report.problems), alert_type="light",
                                   sizing_mode="stretch_width"))
    return pn.Column(*items, sizing_mode="stretch_width")


# --------------------------------------------------------------------------- the session


class DashboardSession:
    """One browser session's page and state; `create_app` makes a new one per session."""

    def __init__(self, options: logic.DashboardOptions, device=DEVICE):
        self.options = options
        self.device = device
        self.start_model = logic.start_model(options)
        self.cards = logic.SessionCards()
        self.views: dict[int, pn.viewable.Viewable] = {}
        self.card_views: dict[int, CardView] = {}
        self.bundle: logic.ModelBundle | None = None
        self.model_problem: str | None = None
        #: Set when the browser session ends: work finishing afterwards no longer updates the page.
        self.closed = False
        if pn.state.curdoc is not None and pn.state.curdoc.session_context is not None:
            pn.state.on_session_destroyed(self._on_session_destroyed)

        choices = logic.model_choices(options.runs_dir, self.start_model)
        self.model_select = pn.widgets.Select(options=choices, sizing_mode="stretch_width",
                                              disabled=not choices)
        self.model_info = _html("", sizing_mode="stretch_width")
        self.model_message = pn.pane.Alert("", alert_type="danger", visible=False, sizing_mode="stretch_width")
        self.threshold_text = _html("", sizing_mode="stretch_width", css_classes=["kh-threshold-text"])
        self.threshold = pn.widgets.FloatSlider(label="Confidence threshold", start=0.0, end=1.0, step=0.05,
                                                value=logic.DEFAULT_THRESHOLD, format="0%",
                                                sizing_mode="stretch_width")
        self.upload = ImageUpload(self._on_file, sizing_mode="stretch_width", css_classes=["kh-upload"],
                                  margin=(5, 10), disabled=True)
        self.clear_button = pn.widgets.Button(label="Clear all cards", color="default",
                                              sizing_mode="stretch_width", css_classes=["kh-clear"])
        self.clear_button.on_click(lambda _event: self.clear())
        self.grid = pn.FlexBox(flex_wrap="wrap", align_content="flex-start", sizing_mode="stretch_width",
                               css_classes=["kh-grid"])
        self.empty_note = pn.pane.Alert("", alert_type="light", sizing_mode="stretch_width")

        if self.start_model is not None:
            self._load(self.start_model)
            start_resolved = Path(self.start_model).resolve()
            self.model_select.value = next(
                (path for path in choices.values() if Path(path).resolve() == start_resolved), None)
        else:
            self.model_problem = (
                f"No trained model found: no `{run_layout.BEST_MODEL}` under `{options.runs_dir}`."
            )
        self.model_select.param.watch(self._on_model, "value")
        self.threshold.param.watch(self._on_threshold, "value")
        self._refresh_status()
        self.run_tab = self._run_tab()
        self.template = self._template()

    def _on_session_destroyed(self, _session_context) -> None:
        self.closed = True

    # ----------------------------------------------------------------- model

    def _load(self, path: Path) -> None:
        try:
            self.bundle = logic.load_model_bundle(path)
            self.model_problem = None
        except KerasHamError as error:
            self.bundle = None
            self.model_problem = str(error)

    async def _on_model(self, event) -> None:
        if not event.new:
            return
        try:
            path = logic.validate_model_choice(event.new, self.options.runs_dir, self.start_model)
        except logic.ModelChoiceError as error:
            self.model_message.object, self.model_message.visible = str(error), True
            return
        self.model_select.loading = True
        try:
            bundle = await asyncio.to_thread(logic.load_model_bundle, path)
        except KerasHamError as error:
            self.model_message.object, self.model_message.visible = str(error), True
            return
        finally:
            self.model_select.loading = False
        self.bundle, self.model_problem = bundle, None
        self.model_message.visible = False
        self._refresh_status()

    def _refresh_status(self) -> None:
        backend = keras.backend.backend()
        device = f"{html.escape(self.device.torch_device)} ({html.escape(self.device.reason)})"
        if self.bundle is not None:
            data = self.bundle.training_data
            data_html = (f'<div class="kh-demo kh-provenance">{html.escape(data.text)} Its predictions mean nothing '
                         "for real lesions.</div>" if data.is_demo else
                         f'<div class="kh-note kh-provenance">Training data: {html.escape(data.text)}</div>')
            ood = self.bundle.ood
            ood_html = (f'<div class="kh-note">Out-of-distribution flag: {html.escape(logic.ood_score_name(ood))} '
                        f'above {ood["threshold"]:.2f} '
                        f'(raised on {100 * ood["false_alarm_rate"]:.0f}\u00a0% of validation images).</div>'
                        if ood else '<div class="kh-note">No out-of-distribution threshold stored with this run.</div>')
            data_html += ood_html
            model = (f"<b>{html.escape(self.bundle.path.parent.name)}</b> · {self.bundle.image_size} px input"
                     f'<div class="kh-note" style="word-break: break-all">{html.escape(str(self.bundle.path))}</div>'
                     f"{data_html}"
                     f'<div class="kh-note">{html.escape(calibration_note(self.bundle))}</div>')
        else:
            model = "<b>none loaded</b>"
        self.model_info.object = (
            f'<div class="kh-note">Backend <b>{html.escape(backend)}</b> · device <b>{device}</b></div>'
            f'<div style="margin-top:4px">Model: {model}</div>'
        )
        self.upload.disabled = self.bundle is None
        self._refresh_threshold_text()
        if self.bundle is None:
            self.empty_note.object = (
                f"### No model to classify with\n{self.model_problem or ''}\n\n"
                f"Train the small demo model (a few minutes on a CPU), then reload this page:\n\n"
                f"```bash\n{logic.DEMO_TRAIN_COMMAND}\n```"
            )
            self.empty_note.alert_type = "warning"
        else:
            self.empty_note.object = (
                "**Drop JPG or PNG images** in the sidebar (several at once to compare them). Each image gets a "
                "card with the predicted class, the probabilities of all seven classes and a Grad-CAM map of the "
                "regions that drove the prediction."
            )
            self.empty_note.alert_type = "light"
        self.empty_note.visible = len(self.cards) == 0

    # ----------------------------------------------------------------- uploads

    async def _on_file(self, filename: str, data: bytes | None, size: int) -> None:
        if data is None:  # refused for its size, in the browser or on the server
            message = logic.too_large_message(filename, size)
            self._show(logic.ErrorCard(self.cards.next_id(), filename, message), None)
            return
        await self.add_upload_async(filename, data)

    async def add_upload_async(self, filename: str, data) -> logic.Card | None:
        card_id = self.cards.next_id()
        placeholder = placeholder_panel(filename)
        self.grid.append(placeholder)
        self.empty_note.visible = False
        bundle = self.bundle
        if bundle is None:
            card: logic.Card = logic.ErrorCard(card_id, filename, "no model is loaded.")
        else:
            try:
                card = await asyncio.to_thread(logic.analyze_upload, filename, data, bundle, card_id=card_id)
            except Exception as error:  # noqa: BLE001 - one bad file must not break the session
                LOG.exception("analysing %s failed", filename)
                message = f"{filename}: analysis failed ({type(error).__name__}: {error})."
                card = logic.ErrorCard(card_id, filename, message)
        if self.closed or placeholder not in self.grid.objects:  # tab closed, or cleared, while analysing
            return None
        self._show(card, placeholder)
        return card

    def add_upload(self, filename: str, data) -> logic.Card:
        """Synchronous twin of `add_upload_async` (tests, scripts): analyse and show one file."""
        if self.bundle is None:
            card: logic.Card = logic.ErrorCard(self.cards.next_id(), filename, "no model is loaded.")
        else:
            card = logic.analyze_upload(filename, data, self.bundle, card_id=self.cards.next_id())
        self._show(card, None)
        return card

    def _show(self, card: logic.Card, placeholder) -> None:
        self.cards.add(card)
        if isinstance(card, logic.ImageCard):
            view = CardView(card, self.threshold.value, self.remove)
            self.card_views[card.card_id] = view
            panel = view.panel
        else:
            panel = error_card_panel(card, self.remove)
        self.views[card.card_id] = panel
        objects = list(self.grid.objects)
        if placeholder is not None and placeholder in objects:
            objects[objects.index(placeholder)] = panel
        else:
            objects.append(panel)
        self.grid.objects = objects
        self.empty_note.visible = False

    def remove(self, card_id: int) -> None:
        self.cards.remove(card_id)
        self.card_views.pop(card_id, None)
        panel = self.views.pop(card_id, None)
        if panel is not None:
            self.grid.objects = [item for item in self.grid.objects if item is not panel]
        self.empty_note.visible = len(self.cards) == 0 and not self.grid.objects

    def clear(self) -> None:
        self.cards.clear()
        self.views.clear()
        self.card_views.clear()
        self.grid.objects = []
        self.empty_note.visible = True

    def _on_threshold(self, event) -> None:
        for view in self.card_views.values():
            view.set_threshold(event.new)
        self._refresh_threshold_text()

    def _refresh_threshold_text(self) -> None:
        if self.bundle is None:
            self.threshold_text.object = ""
            return
        text = logic.threshold_text(self.bundle.path, self.threshold.value, self.bundle.temperature)
        self.threshold_text.object = f'<div class="kh-note kh-threshold-sentence">{html.escape(text)}</div>'

    # ----------------------------------------------------------------- layout

    def _run_dirs(self) -> dict[str, str]:
        runs = {run.label: str(run.run_dir) for run in logic.discover_runs(self.options.runs_dir)}
        if self.start_model is not None:
            start_dir = Path(self.start_model).parent
            known = {Path(path).resolve() for path in runs.values()}
            if start_dir.resolve() not in known and any((start_dir / f).is_file() for f in run_layout.RUN_FILES):
                runs = {f"start model's run: {start_dir.name}": str(start_dir), **runs}
        return runs

    def _run_tab(self) -> pn.Column:
        runs = self._run_dirs()
        if not runs:
            return pn.Column(pn.pane.Alert(
                f"### No runs yet\nNo run folder with `{run_layout.BEST_MODEL}` under `{self.options.runs_dir}`. "
                f"Train the demo model:\n\n```bash\n{logic.DEMO_TRAIN_COMMAND}\n```", alert_type="warning",
                sizing_mode="stretch_width"), sizing_mode="stretch_width")
        current = str(self.bundle.path.parent) if self.bundle is not None else None
        value = next((path for path in runs.values() if current and Path(path).resolve() == Path(current).resolve()),
                     next(iter(runs.values())))
        self.run_select = pn.widgets.Select(label="Run", options=runs, value=value, width=360)
        report = pn.Column(run_report_panel(Path(value)), sizing_mode="stretch_width")

        def show(event) -> None:
            allowed = {Path(path).resolve() for path in self._run_dirs().values()}
            if Path(event.new).resolve() in allowed:  # validated server-side like models
                report.objects = [run_report_panel(Path(event.new))]

        self.run_select.param.watch(show, "value")
        return pn.Column(self.run_select, report, sizing_mode="stretch_width")

    def _template(self):
        sidebar = [
            _html("<h3 style='margin:0'>Model</h3>"),
            self.model_select, self.model_message, self.model_info,
            pn.layout.Divider(),
            _html("<h3 style='margin:0'>Images</h3>"
                  f"<div class='kh-note'>JPG or PNG, up to {logic.MAX_UPLOAD_BYTES // 1_000_000} MB each; "
                  "several at once to compare.</div>"),
            self.upload,
            self.threshold,
            self.threshold_text,
            _html("<div class='kh-note'>Below the threshold a prediction is marked uncertain and the "
                  f"top {logic.TOP_K} classes are listed.</div>"),
            self.clear_button,
            pn.layout.Divider(),
            _html(f'<div class="kh-disclaimer" style="font-size:.85em">{DISCLAIMER}</div>'),
        ]
        classify = pn.Column(self.empty_note, self.grid, name="Classify", sizing_mode="stretch_width")
        tabs = pn.Tabs(("Classify", classify), ("Training run", self.run_tab), dynamic=False,
                       sizing_mode="stretch_width")
        banner = _html(f'<div class="kh-disclaimer">⚠ {DISCLAIMER}</div>', sizing_mode="stretch_width",
                       css_classes=["kh-banner"])
        return pn.template.FastListTemplate(
            title=TITLE,
            sidebar=sidebar,
            main=[banner, tabs],
            header=[_html('<div style="color:#ffe9b3; font-weight:600; padding-top:14px; white-space:nowrap">'
                          "Research &amp; education only · not a medical device · not for diagnosis</div>")],
            accent_base_color=ACCENT,
            header_background=ACCENT,
            sidebar_width=340,
            theme_toggle=False,
            main_layout=None,
        )


def create_app(options: logic.DashboardOptions | None = None) -> DashboardSession:
    """A new page and state for one session (call once per browser session)."""
    options = options if options is not None else logic.parse_options(sys.argv[1:])
    return DashboardSession(options)


# Panel's Fast design links a Google Fonts stylesheet. Without it the page contacts no third
# party (a clinician's browser should not report each visit to a font server) and does not
# block rendering on a network that drops outside traffic; text uses the system sans-serif.
drop_panel_fast_theme_fonts()
pn.extension(notifications=False)

if __name__.startswith("bokeh"):  # `panel serve` runs this file once per session
    with contextlib.suppress(RuntimeError):  # no running loop: not inside a server, nothing to filter
        quiet_client_disconnects(asyncio.get_running_loop())  # a tab closed mid-update is not a traceback
    create_app().template.servable(title=TITLE)
