//! The loss-curve PNG.

use std::path::Path;
use std::sync::OnceLock;

use plotters::prelude::*;
use plotters::style::{register_font, FontStyle};

use crate::log::{read_steps, write_atomically};
use crate::MetricsError;

/// Width of the loss-curve PNG in pixels.
pub const PLOT_WIDTH: u32 = 960;
/// Height of the loss-curve PNG in pixels.
pub const PLOT_HEIGHT: u32 = 540;

/// DejaVu Sans cut down to Latin-1 (see `assets/README.md` and its license file).
static FONT: &[u8] = include_bytes!("../assets/DejaVuSans-subset.ttf");
/// The family name the embedded font is registered under in plotters' font table.
const FAMILY: &str = "sans-serif";

fn register_embedded_font() -> Result<(), String> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let ok = *REGISTERED.get_or_init(|| register_font(FAMILY, FontStyle::Normal, FONT).is_ok());
    if ok {
        Ok(())
    } else {
        Err("the embedded font does not parse".into())
    }
}

/// The debiased exponential moving average (TensorBoard's smoothing, Adam's bias correction):
/// `m_t = beta * m_{t-1} + (1 - beta) * x_t`, `m_0 = 0`, reported as `m_t / (1 - beta^t)`, so
/// the curve starts at the first value instead of at zero.
fn ema(values: &[f64], beta: f64) -> Vec<f64> {
    let mut m = 0.0;
    let mut correction = 1.0;
    values
        .iter()
        .map(|&x| {
            m = beta * m + (1.0 - beta) * x;
            correction *= beta;
            m / (1.0 - correction)
        })
        .collect()
}

/// The EMA's `beta` for `n` points: a span of `n / 20` points (at least 1, at most 200),
/// `beta = 1 - 2 / (span + 1)` as pandas' `ewm(span=..)`.
fn ema_beta(n: usize) -> f64 {
    let span = (n as f64 / 20.0).clamp(1.0, 200.0);
    1.0 - 2.0 / (span + 1.0)
}

/// `[lo, hi]` widened by 5 % on each side (or by a unit-relative margin when `lo == hi`).
fn padded(lo: f64, hi: f64) -> (f64, f64) {
    let span = hi - lo;
    let pad = if span > 0.0 {
        0.05 * span
    } else {
        0.05 * lo.abs().max(1e-3)
    };
    (lo - pad, hi + pad)
}

/// Draws the loss curve of the metrics file `jsonl` (as written by [`crate::MetricsLog`]) into
/// the PNG `png` ([`PLOT_WIDTH`] x [`PLOT_HEIGHT`], RGB), replacing it atomically (temp file +
/// rename), so a viewer never sees a half-written image.
///
/// x is the step, y the loss: the raw loss as a faint line, its debiased EMA (span: 1/20 of the
/// points) as a solid line; the title gives the last step and the last EMA value. Steps with a
/// non-finite loss are left out. The font is embedded, so no system font is needed.
///
/// Errors: the JSONL cannot be read or parsed ([`read_steps`]), it holds no step with a finite
/// loss ([`MetricsError::NoSteps`]), or the PNG cannot be written.
pub fn plot_loss_curve(jsonl: &Path, png: &Path) -> Result<(), MetricsError> {
    let steps = read_steps(jsonl)?;
    let points: Vec<(f64, f64)> = steps
        .iter()
        .filter(|r| r.loss.is_finite())
        .map(|r| (r.step as f64, r.loss))
        .collect();
    if points.is_empty() {
        return Err(MetricsError::NoSteps {
            path: jsonl.to_path_buf(),
        });
    }
    let losses: Vec<f64> = points.iter().map(|p| p.1).collect();
    let smooth: Vec<(f64, f64)> = points
        .iter()
        .zip(ema(&losses, ema_beta(points.len())))
        .map(|(&(x, _), y)| (x, y))
        .collect();

    let rgb = render(&points, &smooth).map_err(|message| MetricsError::Plot {
        path: png.to_path_buf(),
        message,
    })?;
    let mut encoded = Vec::new();
    image::RgbImage::from_raw(PLOT_WIDTH, PLOT_HEIGHT, rgb)
        .expect("the buffer is PLOT_WIDTH x PLOT_HEIGHT x 3")
        .write_to(
            &mut std::io::Cursor::new(&mut encoded),
            image::ImageFormat::Png,
        )
        .map_err(|e| MetricsError::Plot {
            path: png.to_path_buf(),
            message: format!("PNG encoding failed: {e}"),
        })?;
    if let Some(dir) = png.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .map_err(|e| MetricsError::io("cannot create the folder of", png, e))?;
    }
    write_atomically(png, &encoded)
}

/// Renders the chart into an RGB buffer.
fn render(raw: &[(f64, f64)], smooth: &[(f64, f64)]) -> Result<Vec<u8>, String> {
    register_embedded_font()?;
    let fail = |e: &dyn std::fmt::Display| e.to_string();
    let (x0, x1) = (
        raw[0].0.min(raw[raw.len() - 1].0),
        raw.iter().map(|p| p.0).fold(f64::MIN, f64::max),
    );
    let (x0, x1) = if x1 > x0 {
        (x0, x1)
    } else {
        (x0 - 1.0, x0 + 1.0)
    };
    let lo = raw.iter().map(|p| p.1).fold(f64::INFINITY, f64::min);
    let hi = raw.iter().map(|p| p.1).fold(f64::NEG_INFINITY, f64::max);
    let (y0, y1) = padded(lo, hi);
    let (last_step, last_ema) = smooth[smooth.len() - 1];
    // Enough decimals to tell the y ticks apart: two more than the range's first digit.
    let decimals = ((-(y1 - y0).log10()).ceil() as i64 + 2).clamp(1, 10) as usize;
    let y_label = move |y: &f64| format!("{y:.decimals$}");

    let mut buf = vec![0u8; PLOT_WIDTH as usize * PLOT_HEIGHT as usize * 3];
    {
        let root =
            BitMapBackend::with_buffer(&mut buf, (PLOT_WIDTH, PLOT_HEIGHT)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| fail(&e))?;
        let title = format!("training loss (step {last_step}, EMA {last_ema:.4})");
        let mut chart = ChartBuilder::on(&root)
            .caption(title, (FAMILY, 22))
            .margin(16)
            .x_label_area_size(44)
            .y_label_area_size(72)
            .build_cartesian_2d(x0..x1, y0..y1)
            .map_err(|e| fail(&e))?;
        chart
            .configure_mesh()
            .x_desc("step")
            .y_desc("loss")
            .label_style((FAMILY, 14))
            .axis_desc_style((FAMILY, 16))
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_label_formatter(&y_label)
            .light_line_style(RGBColor(235, 235, 235))
            .bold_line_style(RGBColor(210, 210, 210))
            .draw()
            .map_err(|e| fail(&e))?;
        let raw_colour = RGBColor(31, 119, 180);
        chart
            .draw_series(LineSeries::new(
                raw.iter().copied(),
                raw_colour.mix(0.3).stroke_width(1),
            ))
            .map_err(|e| fail(&e))?
            .label("loss")
            .legend(move |(x, y)| {
                PathElement::new([(x, y), (x + 20, y)], raw_colour.mix(0.3).stroke_width(2))
            });
        let ema_colour = RGBColor(214, 39, 40);
        chart
            .draw_series(LineSeries::new(
                smooth.iter().copied(),
                ema_colour.stroke_width(2),
            ))
            .map_err(|e| fail(&e))?
            .label("EMA")
            .legend(move |(x, y)| {
                PathElement::new([(x, y), (x + 20, y)], ema_colour.stroke_width(2))
            });
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .label_font((FAMILY, 14))
            .background_style(WHITE.mix(0.85))
            .border_style(RGBColor(160, 160, 160))
            .draw()
            .map_err(|e| fail(&e))?;
        root.present().map_err(|e| fail(&e))?;
    }
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{MetricsLog, StepRecord};

    #[test]
    fn ema_is_debiased_and_smooths() {
        let e = ema(&[2.0, 2.0, 2.0], 0.9);
        assert!(e.iter().all(|v| (v - 2.0).abs() < 1e-12), "{e:?}");
        let e = ema(&[0.0, 1.0], 0.5);
        // m1 = 0, m2 = 0.5 -> 0.5 / (1 - 0.25)
        assert!((e[1] - 2.0 / 3.0).abs() < 1e-12, "{e:?}");
        assert_eq!(ema_beta(10), 0.0);
        assert!((ema_beta(400) - (1.0 - 2.0 / 21.0)).abs() < 1e-12);
    }

    fn write_log(path: &Path, losses: &[f64]) {
        let mut log = MetricsLog::open(path, None).unwrap();
        for (i, &loss) in losses.iter().enumerate() {
            let step = i as u64 + 1;
            log.log(&StepRecord {
                step,
                epoch: 0,
                loss,
                lr: 1e-4,
                grad_norm: 1.0,
                step_time_s: 0.5,
                samples_per_s: 2.0,
                timesteps: Vec::new(),
                dropped_captions: 0,
            })
            .unwrap();
        }
    }

    #[test]
    fn the_png_decodes_with_the_size_and_has_a_drawn_curve() {
        let dir = tempfile::tempdir().unwrap();
        let jsonl = dir.path().join("metrics.jsonl");
        // A falling, noisy curve with one diverged step, which is left out.
        let mut losses: Vec<f64> = (0..300)
            .map(|i| 1.0 / (1.0 + i as f64 * 0.05) + 0.05 * ((i * 7919) % 13) as f64 / 13.0)
            .collect();
        losses[150] = f64::NAN;
        write_log(&jsonl, &losses);
        let png = dir.path().join("plots/loss.png");
        plot_loss_curve(&jsonl, &png).unwrap();
        let img = image::load_from_memory_with_format(
            &std::fs::read(&png).unwrap(),
            image::ImageFormat::Png,
        )
        .unwrap()
        .to_rgb8();
        assert_eq!(img.dimensions(), (PLOT_WIDTH, PLOT_HEIGHT));
        let count = |f: &dyn Fn(&image::Rgb<u8>) -> bool| img.pixels().filter(|p| f(p)).count();
        // The EMA line is red; text and axes are dark.
        let red = count(&|p| p[0] > 150 && p[1] < 90 && p[2] < 90);
        let dark = count(&|p| p[0] < 80 && p[1] < 80 && p[2] < 80);
        let white = count(&|p| p.0 == [255, 255, 255]);
        assert!(red > 500, "EMA pixels: {red}");
        assert!(dark > 1500, "text and axis pixels: {dark}");
        assert!(
            white > (PLOT_WIDTH * PLOT_HEIGHT / 2) as usize,
            "background: {white}"
        );
        // Rewriting replaces the file and leaves no temporary behind.
        write_log(&jsonl, &[0.5]);
        plot_loss_curve(&jsonl, &png).unwrap();
        let names: Vec<_> = std::fs::read_dir(png.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("loss.png")]);
    }

    #[test]
    fn the_text_is_rendered_with_the_embedded_font() {
        // The caption alone, over an empty chart area: its dark pixels come from glyphs.
        let dir = tempfile::tempdir().unwrap();
        let jsonl = dir.path().join("m.jsonl");
        write_log(&jsonl, &[1.0, 1.0]);
        let png = dir.path().join("loss.png");
        plot_loss_curve(&jsonl, &png).unwrap();
        let img = image::open(&png).unwrap().to_rgb8();
        // The title band (top 40 rows) holds anti-aliased text: many distinct grey levels.
        let mut greys = std::collections::BTreeSet::new();
        for y in 0..40 {
            for x in 0..PLOT_WIDTH {
                let p = img.get_pixel(x, y);
                if p[0] == p[1] && p[1] == p[2] && p[0] < 250 {
                    greys.insert(p[0]);
                }
            }
        }
        assert!(
            greys.len() > 20,
            "anti-aliased glyph levels in the title: {}",
            greys.len()
        );
    }

    #[test]
    fn nothing_to_plot_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let jsonl = dir.path().join("m.jsonl");
        write_log(&jsonl, &[f64::NAN]);
        let e = plot_loss_curve(&jsonl, &dir.path().join("x.png"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("m.jsonl has no step record with a finite loss"),
            "{e}"
        );
        assert!(!dir.path().join("x.png").exists());
    }
}
