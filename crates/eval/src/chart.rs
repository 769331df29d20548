//! PNG bar chart of reasoning-language accuracy per requested language, one bar per compared
//! model, with 95 % interval whiskers, labelled axes, ticks, a legend and a title.
//!
//! # Text without system fonts
//!
//! plotters draws text through a font backend: its default `ttf` feature asks the system
//! (fontconfig) for fonts, and with no font feature at all every text call fails — which is
//! why a chart built without one must skip labels. Here plotters is built with its `ab_glyph`
//! feature (a pure-Rust rasterizer, no system libraries) and [`register_fonts`] hands it DejaVu
//! Sans, embedded in the binary by the `dejavu` crate, under the family name `sans-serif`
//! (plotters' default family). So any plotters chart of the workspace can carry text offline:
//! call [`register_fonts`] once before drawing, then use fonts as usual
//! (`("sans-serif", 20).into_font()`, `caption`, `x_desc`, …).
//!
//! The chart is drawn into an RGB buffer and encoded as PNG in memory, then written atomically
//! (`<path>.tmp`, then rename).

use std::path::Path;
use std::sync::OnceLock;

use plotters::backend::RGBPixel;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::error::{EvalError, Result};
use crate::language::Language;
use crate::metrics::EvalSummary;
use crate::report::write_atomic;

static FONTS: OnceLock<std::result::Result<(), String>> = OnceLock::new();

/// Registers the embedded DejaVu Sans (regular, bold, oblique) as plotters' `sans-serif`
/// family; idempotent and thread-safe. Every chart writer of this crate calls it.
pub fn register_fonts() -> Result<()> {
    FONTS
        .get_or_init(|| {
            let faces: [(FontStyle, &'static [u8]); 3] = [
                (FontStyle::Normal, dejavu::sans::regular()),
                (FontStyle::Bold, dejavu::sans::bold()),
                (FontStyle::Oblique, dejavu::sans::oblique()),
            ];
            for (style, bytes) in faces {
                plotters::style::register_font("sans-serif", style, bytes).map_err(|_| {
                    format!(
                        "the embedded DejaVu Sans ({}) is not a valid font",
                        style.as_str()
                    )
                })?;
            }
            Ok(())
        })
        .clone()
        .map_err(|message| EvalError::Plot {
            path: "<font registration>".into(),
            message,
        })
}

/// Bar colours, one per compared model (cycled).
const PALETTE: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

/// Chart height in pixels; the width grows with the number of bars (at least 720).
pub const CHART_HEIGHT: u32 = 520;

/// The chart's width for `languages` groups of `models` bars.
pub fn chart_width(languages: usize, models: usize) -> u32 {
    let per_group = 24 + 36 * models.max(1);
    let w = 160 + languages.max(1) * per_group;
    u32::try_from(w).unwrap_or(u32::MAX).clamp(720, 4000)
}

/// The requested languages present in any of the summaries, in [`Language::ALL`] order.
pub fn chart_languages(models: &[(&str, &EvalSummary)]) -> Vec<Language> {
    Language::ALL
        .into_iter()
        .filter(|l| {
            models
                .iter()
                .any(|(_, s)| s.reasoning_language.per_language.contains_key(l))
        })
        .collect()
}

/// Writes the reasoning-language accuracy chart to `path` (PNG): x = requested language (one
/// group each), y = accuracy in %, one bar per model with its Wilson 95 % interval and value.
/// With no row requesting a language, the chart says so instead of showing bars.
pub fn write_language_chart(path: &Path, models: &[(&str, &EvalSummary)]) -> Result<()> {
    register_fonts()?;
    let languages = chart_languages(models);
    let (w, h) = (chart_width(languages.len(), models.len()), CHART_HEIGHT);
    let mut buf = vec![255u8; w as usize * h as usize * 3];
    draw(path, &mut buf, (w, h), &languages, models)?;
    let img = image::RgbImage::from_raw(w, h, buf)
        .ok_or_else(|| EvalError::plot(path, "pixel buffer has the wrong size"))?;
    let mut png = std::io::Cursor::new(Vec::new());
    img.write_to(&mut png, image::ImageOutputFormat::Png)
        .map_err(|e| EvalError::plot(path, format!("PNG encoding failed: {e}")))?;
    write_atomic(path, png.get_ref())
}

fn draw(
    path: &Path,
    buf: &mut [u8],
    (w, h): (u32, u32),
    languages: &[Language],
    models: &[(&str, &EvalSummary)],
) -> Result<()> {
    let err = |e: &dyn std::fmt::Display| EvalError::plot(path, e);
    let backend =
        BitMapBackend::<RGBPixel>::with_buffer_and_format(buf, (w, h)).map_err(|e| err(&e))?;
    let root = backend.into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    // Integer coordinates (plotters formats tick labels of integer axes, with key points, by
    // itself): x in thousandths of a language group, y in tenths of a percent.
    const GROUP: i32 = 1000;
    const PCT: f64 = 10.0;
    let groups = i32::try_from(languages.len().max(1)).unwrap_or(i32::MAX / GROUP);
    let ticks: Vec<i32> = (0..groups).map(|i| i * GROUP + GROUP / 2).collect();
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Reasoning-language accuracy by requested language",
            ("sans-serif", 24).into_font().style(FontStyle::Bold),
        )
        .margin(16)
        .x_label_area_size(56)
        .y_label_area_size(72)
        .build_cartesian_2d(
            (0..groups * GROUP).with_key_points(ticks),
            (0..1250).with_key_points(vec![0, 200, 400, 600, 800, 1000]),
        )
        .map_err(|e| err(&e))?;
    let name_of = |x: &i32| {
        usize::try_from(x / GROUP)
            .ok()
            .and_then(|i| languages.get(i))
            .map_or_else(String::new, |l| l.name().to_string())
    };
    chart
        .configure_mesh()
        .disable_x_mesh()
        .light_line_style(WHITE)
        .bold_line_style(RGBColor(225, 225, 225))
        .x_desc("requested reasoning language (system prompt)")
        .y_desc("analysis channel in that language (%)")
        .axis_desc_style(("sans-serif", 18))
        .label_style(("sans-serif", 15))
        .x_label_formatter(&name_of)
        .y_label_formatter(&|y| format!("{}", y / 10))
        .draw()
        .map_err(|e| err(&e))?;
    if languages.is_empty() {
        chart
            .draw_series(std::iter::once(Text::new(
                "no row requested a reasoning language",
                (GROUP / 10, 550),
                ("sans-serif", 20).into_font(),
            )))
            .map_err(|e| err(&e))?;
        root.present().map_err(|e| err(&e))?;
        return Ok(());
    }
    let n = i32::try_from(models.len().max(1)).unwrap_or(i32::MAX);
    let pad = GROUP * 12 / 100;
    let bar_w = ((GROUP - 2 * pad) / n).max(1);
    let to_y = |rate: f64| (rate * 100.0 * PCT).round() as i32;
    let value_style =
        TextStyle::from(("sans-serif", 13).into_font()).pos(Pos::new(HPos::Center, VPos::Bottom));
    for (j, (label, summary)) in models.iter().enumerate() {
        let color = PALETTE[j % PALETTE.len()];
        let j = i32::try_from(j).unwrap_or(i32::MAX);
        let mut bars = Vec::new();
        let mut whiskers = Vec::new();
        let mut values = Vec::new();
        for (i, lang) in (0..).zip(languages) {
            let Some(p) = summary.reasoning_language.per_language.get(lang) else {
                continue;
            };
            let x0 = i * GROUP + pad + j * bar_w;
            let (x1, xm) = (x0 + bar_w * 9 / 10, x0 + bar_w * 9 / 20);
            let y = to_y(p.rate);
            bars.push(Rectangle::new([(x0, 0), (x1, y)], color.filled()));
            let (lo, hi) = (to_y(p.ci95.0), to_y(p.ci95.1));
            let cap = (bar_w * 15 / 100).max(1);
            whiskers.push(PathElement::new(vec![(xm, lo), (xm, hi)], BLACK));
            whiskers.push(PathElement::new(
                vec![(xm - cap, lo), (xm + cap, lo)],
                BLACK,
            ));
            whiskers.push(PathElement::new(
                vec![(xm - cap, hi), (xm + cap, hi)],
                BLACK,
            ));
            values.push(Text::new(
                format!("{:.0}", p.rate * 100.0),
                (xm, hi.max(y) + 12),
                value_style.clone(),
            ));
        }
        chart
            .draw_series(bars)
            .map_err(|e| err(&e))?
            .label(label.to_string())
            .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 14, y + 6)], color.filled()));
        chart.draw_series(whiskers).map_err(|e| err(&e))?;
        chart.draw_series(values).map_err(|e| err(&e))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 15))
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}
