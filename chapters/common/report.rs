//! What a chapter leaves in its output folder: `summary.json`, `losses.csv` and a loss curve.

use crate::common::Run;
use crate::common::train::{LossRecord, StepRecord, TrainReport};
use anyhow::{Context, Result};
use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;
use serde::Serialize;
use std::fs;
use std::path::Path;

#[derive(Serialize)]
pub struct Summary<'a, H: Serialize> {
    pub chapter: &'a str,
    pub backend: String,
    pub seed: u64,
    pub hyperparameters: H,
    pub parameters: usize,
    pub steps: usize,
    pub final_train_loss: f64,
    pub final_val_loss: f64,
    pub wall_seconds: f64,
    pub train_seconds: f64,
    pub tokens_per_second: f64,
    pub data: String,
    /// The machine's CPU (the wall times depend on it).
    pub cpu: String,
    /// Chapters that train more than one model list each here (the top-level numbers are
    /// the chapter's final model).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub variants: Vec<Variant>,
}

impl<'a, H: Serialize> Summary<'a, H> {
    /// The summary of a run whose final model is `parameters` large and trained as `report` says.
    pub fn new(
        chapter: &'a str,
        run: &Run,
        hyperparameters: H,
        parameters: usize,
        report: &TrainReport,
    ) -> Self {
        let last = final_losses(report);
        Self {
            chapter,
            backend: run.backend.to_string(),
            seed: run.seed,
            hyperparameters,
            parameters,
            steps: last.step,
            final_train_loss: last.train,
            final_val_loss: last.val,
            wall_seconds: report.wall_seconds,
            train_seconds: report.train_seconds,
            tokens_per_second: report.tokens_per_second,
            data: run.corpus.path.display().to_string(),
            cpu: Machine::cpu(),
            variants: vec![],
        }
    }
}

fn final_losses(report: &TrainReport) -> LossRecord {
    report.losses.last().copied().unwrap_or(LossRecord {
        step: 0,
        train: f64::NAN,
        val: f64::NAN,
    })
}

#[derive(Serialize, Clone, Debug)]
pub struct Variant {
    pub name: String,
    pub parameters: usize,
    pub final_train_loss: f64,
    pub final_val_loss: f64,
    pub wall_seconds: f64,
    pub tokens_per_second: f64,
}

impl Variant {
    pub fn new(name: &str, parameters: usize, report: &TrainReport) -> Self {
        let last = final_losses(report);
        Self {
            name: name.to_string(),
            parameters,
            final_train_loss: last.train,
            final_val_loss: last.val,
            wall_seconds: report.wall_seconds,
            tokens_per_second: report.tokens_per_second,
        }
    }
}

/// One trained model's logs, as a run writes and plots them.
pub struct Curve<'a> {
    /// Empty for a chapter's only model; otherwise it names the files (`losses_<name>.csv`).
    pub name: &'a str,
    pub losses: &'a [LossRecord],
    pub steps: &'a [StepRecord],
}

impl<'a> Curve<'a> {
    pub fn of(name: &'a str, report: &'a TrainReport) -> Self {
        Self {
            name,
            losses: &report.losses,
            steps: &report.steps,
        }
    }
}

/// Writes summary.json, and for each curve losses*.csv (the evaluations) and steps*.csv (every
/// step), and loss_curve.svg with all of them. Returns the names of the files written.
pub fn write_run<H: Serialize>(
    out: &Path,
    summary: &Summary<'_, H>,
    title: &str,
    curves: &[Curve],
) -> Result<Vec<String>> {
    let mut files = vec!["summary.json".to_string()];
    write_json(&out.join("summary.json"), summary)?;
    for c in curves {
        let suffix = match c.name {
            "" => String::new(),
            name => format!("_{}", name.to_lowercase().replace(' ', "_")),
        };
        write_losses_csv(&out.join(format!("losses{suffix}.csv")), c.losses)?;
        write_steps_csv(&out.join(format!("steps{suffix}.csv")), c.steps)?;
        files.extend([format!("losses{suffix}.csv"), format!("steps{suffix}.csv")]);
    }
    plot_losses(&out.join("loss_curve.svg"), title, curves)?;
    files.push("loss_curve.svg".into());
    Ok(files)
}

/// Writes a file through a temporary sibling and a rename, so readers never see half of it.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let tmp = path.with_extension(format!(
        "{}.tmp",
        path.extension().and_then(|e| e.to_str()).unwrap_or("")
    ));
    fs::write(&tmp, bytes).with_context(|| format!("cannot write {}", tmp.display()))?;
    fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

pub fn write_json(path: &Path, value: &impl Serialize) -> Result<()> {
    let mut text = serde_json::to_string_pretty(value)?;
    text.push('\n');
    write_atomic(path, text.as_bytes())
}

pub fn write_losses_csv(path: &Path, losses: &[LossRecord]) -> Result<()> {
    let mut csv = String::from("step,train,val\n");
    for r in losses {
        csv.push_str(&format!("{},{:.6},{:.6}\n", r.step, r.train, r.val));
    }
    write_atomic(path, csv.as_bytes())
}

pub fn write_steps_csv(path: &Path, steps: &[StepRecord]) -> Result<()> {
    let mut csv = String::from("step,loss,lr,grad_norm,ms\n");
    for r in steps {
        csv.push_str(&format!(
            "{},{:.6},{:.6e},{:.6},{:.3}\n",
            r.step, r.loss, r.lr, r.grad_norm, r.ms
        ));
    }
    write_atomic(path, csv.as_bytes())
}

/// The per-step batch losses averaged over bins of consecutive steps, so that a long run
/// draws about 300 points: (mean step, mean loss).
fn binned(steps: &[StepRecord]) -> Vec<(f64, f64)> {
    let bin = steps.len().div_ceil(300).max(1);
    steps
        .chunks(bin)
        .map(|c| {
            let n = c.len() as f64;
            let step = c.iter().map(|r| r.step as f64).sum::<f64>() / n;
            (step + 1.0, c.iter().map(|r| r.loss).sum::<f64>() / n)
        })
        .collect()
}

/// A part of an SVG picture to draw in (the whole picture, or one of its panels).
pub type Area<'a> = DrawingArea<SVGBackend<'a>, plotters::coord::Shift>;

/// The legend of every chart in the course: each series' label in a framed white box.
pub fn draw_legend<'a, CT: CoordTranslate>(
    chart: &mut ChartContext<'a, SVGBackend<'a>, CT>,
    position: SeriesLabelPosition,
) -> Result<()> {
    chart
        .configure_series_labels()
        .position(position)
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .draw()?;
    Ok(())
}

/// A chart with a step axis (`f64`) and a value axis (`f64`), drawn into an SVG.
type StepChart<'a, 'b> =
    ChartContext<'a, SVGBackend<'b>, Cartesian2d<RangedCoordf64, RangedCoordf64>>;

/// Train and val loss against step, one or more runs on one chart (SVG): the estimates as
/// lines with points, every step's batch loss (binned) as a faint line under them.
pub fn plot_losses(path: &Path, title: &str, runs: &[Curve]) -> Result<()> {
    let all = runs.iter().flat_map(|c| c.losses.iter());
    let max_step = all.clone().map(|r| r.step).max().unwrap_or(1).max(1) as f64;
    let (lo, hi) = all.fold((f64::MAX, f64::MIN), |(lo, hi), r| {
        (lo.min(r.train).min(r.val), hi.max(r.train).max(r.val))
    });
    let pad = ((hi - lo) * 0.05).max(0.01);
    let root = SVGBackend::new(path, (800, 480)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(55)
        .build_cartesian_2d(0f64..max_step, (lo - pad)..(hi + pad))?;
    chart
        .configure_mesh()
        .x_desc("step")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_desc("cross-entropy loss (nats)")
        .draw()?;
    // (train, val) colour pairs from the Tableau palette, one pair per run.
    let palette = [
        (RGBColor(31, 119, 180), RGBColor(255, 127, 14)),
        (RGBColor(44, 160, 44), RGBColor(214, 39, 40)),
        (RGBColor(148, 103, 189), RGBColor(140, 86, 75)),
    ];
    for (i, run) in runs.iter().enumerate() {
        draw_run(
            &mut chart,
            run,
            palette[i % palette.len()],
            (lo - pad)..(hi + pad),
        )?;
    }
    draw_legend(&mut chart, SeriesLabelPosition::MiddleRight)?;
    root.present()?;
    Ok(())
}

/// One run's three lines: its binned batch losses (faint, only those inside `y_range`), and
/// its train and val estimates.
fn draw_run(
    chart: &mut StepChart,
    run: &Curve,
    (color, val_color): (RGBColor, RGBColor),
    y_range: std::ops::Range<f64>,
) -> Result<()> {
    let prefix = match run.name {
        "" => String::new(),
        name => format!("{name} "),
    };
    let legend = |style: ShapeStyle| {
        move |(x, y): (i32, i32)| PathElement::new(vec![(x, y), (x + 20, y)], style)
    };
    let batches = binned(run.steps)
        .into_iter()
        .filter(|(_, l)| y_range.contains(l));
    let faint = color.mix(0.35);
    chart
        .draw_series(LineSeries::new(batches, faint.stroke_width(1)))?
        .label(format!("{prefix}train batch loss"))
        .legend(legend(faint.into()));
    let train = run.losses.iter().map(|r| (r.step as f64, r.train));
    chart
        .draw_series(LineSeries::new(train, color.stroke_width(2)).point_size(3))?
        .label(format!("{prefix}train"))
        .legend(legend(color.into()));
    let (val, val_style) = (
        run.losses.iter().map(|r| (r.step as f64, r.val)),
        val_color.stroke_width(2),
    );
    chart
        .draw_series(LineSeries::new(val, val_style).point_size(3))?
        .label(format!("{prefix}val"))
        .legend(legend(val_style));
    Ok(())
}

/// The per-step log as two charts, one above the other: the learning rate, and the gradient
/// norm before clipping (every step, with the clipping threshold as a dashed line).
pub fn plot_schedule(
    path: &Path,
    title: &str,
    steps: &[StepRecord],
    clip: Option<f64>,
) -> Result<()> {
    let root = SVGBackend::new(path, (800, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled(title, ("sans-serif", 22))?;
    let (top, bottom) = root.split_vertically(250);
    plot_lr(&top, steps)?;
    plot_grad_norm(&bottom, steps, clip)?;
    root.present()?;
    Ok(())
}

/// The last step, as the charts' width.
fn max_step(steps: &[StepRecord]) -> f64 {
    steps.last().map_or(1, |r| r.step + 1) as f64
}

/// The learning rate at every step.
fn plot_lr(area: &Area, steps: &[StepRecord]) -> Result<()> {
    let lr_max = steps.iter().map(|r| r.lr).fold(0.0, f64::max) * 1.05;
    let mut lr = ChartBuilder::on(area)
        .margin(12)
        .x_label_area_size(30)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..max_step(steps), 0f64..lr_max.max(1e-12))?;
    lr.configure_mesh()
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_desc("learning rate")
        .y_label_formatter(&|y| format!("{y:.1e}"))
        .draw()?;
    lr.draw_series(LineSeries::new(
        steps.iter().map(|r| (r.step as f64, r.lr)),
        RGBColor(31, 119, 180).stroke_width(2),
    ))?;
    Ok(())
}

/// Every step's gradient norm as a dot, and the clipping threshold as a dashed line.
fn plot_grad_norm(area: &Area, steps: &[StepRecord], clip: Option<f64>) -> Result<()> {
    let max_step = max_step(steps);
    let norm_max = steps
        .iter()
        .map(|r| r.grad_norm)
        .fold(clip.unwrap_or(0.0), f64::max)
        * 1.05;
    let mut norm = ChartBuilder::on(area)
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..max_step, 0f64..norm_max.max(1e-12))?;
    norm.configure_mesh()
        .x_label_formatter(&|x| format!("{x:.0}"))
        .x_desc("step")
        .y_desc("gradient norm before clipping")
        .draw()?;
    let blue = RGBColor(31, 119, 180);
    let points = steps
        .iter()
        .map(|r| Circle::new((r.step as f64, r.grad_norm), 1, blue.mix(0.7).filled()));
    norm.draw_series(points)?;
    let Some(clip) = clip else { return Ok(()) };
    let red = RGBColor(214, 39, 40);
    let dashes = (0..40).map(|i| {
        let x = max_step * i as f64 / 40.0;
        PathElement::new(
            vec![(x, clip), (x + max_step / 80.0, clip)],
            red.stroke_width(2),
        )
    });
    norm.draw_series(dashes)?
        .label(format!("clip at {clip}"))
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], red));
    draw_legend(&mut norm, SeriesLabelPosition::MiddleRight)?;
    Ok(())
}

/// The first colours of the Tableau palette, for charts of a few named series.
pub const PALETTE: [RGBColor; 5] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
];

/// Named curves `(x, y)` on one chart (SVG), e.g. activation functions.
pub fn plot_curves(
    path: &Path,
    title: &str,
    x_desc: &str,
    curves: &[(&str, Vec<(f64, f64)>)],
) -> Result<()> {
    plot_curves_at(path, title, x_desc, curves, SeriesLabelPosition::UpperLeft)
}

/// `plot_curves` with the legend where the curves leave room (falling curves: upper right).
pub fn plot_curves_at(
    path: &Path,
    title: &str,
    x_desc: &str,
    curves: &[(&str, Vec<(f64, f64)>)],
    legend: SeriesLabelPosition,
) -> Result<()> {
    let points = || curves.iter().flat_map(|(_, c)| c.iter());
    let (x0, x1) = points().fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.0), b.max(p.0)));
    let (y0, y1) = points().fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.1), b.max(p.1)));
    let pad = (y1 - y0) * 0.05;
    let path_str = path.to_string_lossy().to_string();
    let root = SVGBackend::new(&path_str, (640, 400)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(35)
        .y_label_area_size(45)
        .build_cartesian_2d(x0..x1, (y0 - pad)..(y1 + pad))?;
    chart.configure_mesh().x_desc(x_desc).draw()?;
    for (i, (name, curve)) in curves.iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        chart
            .draw_series(LineSeries::new(
                curve.iter().copied(),
                color.stroke_width(2),
            ))?
            .label(*name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    }
    draw_legend(&mut chart, legend)?;
    root.present()?;
    Ok(())
}

/// Named series of bars side by side at whole-number `x` (a grouped histogram, SVG).
pub fn plot_bars(
    path: &Path,
    title: &str,
    x_desc: &str,
    series: &[(&str, Vec<(f64, f64)>)],
) -> Result<()> {
    let points = || series.iter().flat_map(|(_, s)| s.iter());
    let x0 = points().map(|p| p.0).fold(f64::MAX, f64::min);
    let x1 = points().map(|p| p.0).fold(f64::MIN, f64::max);
    let y1 = points().map(|p| p.1).fold(0.0, f64::max);
    let path_str = path.to_string_lossy().to_string();
    let root = SVGBackend::new(&path_str, (640, 400)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(35)
        .y_label_area_size(45)
        .build_cartesian_2d((x0 - 0.5)..(x1 + 0.5), 0.0..(y1 * 1.05))?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_desc(x_desc)
        .draw()?;
    let width = 0.8 / series.len().max(1) as f64;
    for (i, (name, bars)) in series.iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        let left = -0.4 + i as f64 * width;
        chart
            .draw_series(bars.iter().map(|&(x, y)| {
                Rectangle::new(
                    [(x + left, 0.0), (x + left + width * 0.9, y)],
                    color.filled(),
                )
            }))?
            .label(*name)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], color.filled()));
    }
    draw_legend(&mut chart, SeriesLabelPosition::UpperRight)?;
    root.present()?;
    Ok(())
}

/// The machine a benchmark ran on.
#[derive(Serialize, Clone, Debug)]
pub struct Machine {
    pub cpu: String,
    pub cores: usize,
    pub os: String,
    /// GPU adapters as wgpu reports them: "name (backend, driver driver_info)".
    pub gpu_adapters: Vec<String>,
}

impl Machine {
    /// The machine, with its GPU adapters listed only when `with_gpu` (asking wgpu for
    /// adapters starts a graphics driver, which has no business in a CPU run).
    pub fn detect(with_gpu: bool) -> Self {
        Self {
            cpu: Self::cpu(),
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            os: std::env::consts::OS.to_string(),
            gpu_adapters: if with_gpu { gpu_adapters() } else { Vec::new() },
        }
    }

    /// The CPU's model name, from /proc/cpuinfo (the architecture elsewhere).
    pub fn cpu() -> String {
        std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("model name"))
                    .and_then(|l| l.split(':').nth(1))
                    .map(|m| m.trim().to_string())
            })
            .unwrap_or_else(|| std::env::consts::ARCH.to_string())
    }
}

#[cfg(feature = "wgpu")]
fn gpu_adapters() -> Vec<String> {
    let instance = wgpu::Instance::default();
    futures_lite::future::block_on(instance.enumerate_adapters(wgpu::Backends::all()))
        .into_iter()
        .map(|a| {
            let i = a.get_info();
            format!(
                "{} ({:?}, {} {})",
                i.name, i.backend, i.driver, i.driver_info
            )
        })
        .collect()
}

#[cfg(not(feature = "wgpu"))]
fn gpu_adapters() -> Vec<String> {
    Vec::new()
}
