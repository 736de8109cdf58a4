//! The benchmark report: one markdown table per section and an SVG bar chart of the
//! ratios, written under `target/bench/` and printed to stdout.

use std::fmt::Write as _;
use std::path::PathBuf;

use anyhow::{Context, Result};

struct KernelRow {
    case: String,
    clients: u32,
    ns: f64,
    empty_ns: f64,
    passed: bool,
}

struct ForwardRow {
    method: String,
    clients: u32,
    direction: &'static str,
    gbits: f64,
    baseline_gbits: f64,
}

/// Lines of a free-form section (controller figures, notes on what was skipped).
struct Note {
    section: &'static str,
    text: String,
}

#[derive(Default)]
pub struct Report {
    kernel: Vec<KernelRow>,
    forwarding: Vec<ForwardRow>,
    notes: Vec<Note>,
}

impl Report {
    pub fn kernel(&mut self, case: &str, clients: u32, ns: f64, empty_ns: f64, passed: bool) {
        eprintln!("  {case:<36} {clients:>6} clients  {ns:>6.1} ns/frame (empty {empty_ns:.1})");
        self.kernel.push(KernelRow { case: case.to_string(), clients, ns, empty_ns, passed });
    }

    pub fn forwarding(&mut self, method: &str, clients: u32, direction: &'static str, gbits: f64, baseline_gbits: f64) {
        eprintln!("  {method:<28} {clients:>5} clients {direction:<8} {gbits:>7.2} Gbit/s (no program {baseline_gbits:.2})");
        self.forwarding.push(ForwardRow { method: method.to_string(), clients, direction, gbits, baseline_gbits });
    }

    pub fn note(&mut self, section: &'static str, text: impl Into<String>) {
        let text = text.into();
        eprintln!("  {section}: {text}");
        self.notes.push(Note { section, text });
    }

    fn markdown(&self) -> String {
        let mut s = String::from("# BitMesh benchmark report\n\n");
        s.push_str("Ratios are measured side by side in one run on this machine; absolute numbers vary between machines.\n\n");
        s.push_str("## Kernel cost per frame (BPF_PROG_TEST_RUN)\n\n");
        s.push_str("| case | clients | ns/frame | empty program ns/frame | ratio | verdict |\n|---|---:|---:|---:|---:|---|\n");
        for r in &self.kernel {
            let _ = writeln!(
                s,
                "| {} | {} | {:.1} | {:.1} | {:.2} | {} |",
                r.case,
                r.clients,
                r.ns,
                r.empty_ns,
                ratio(r.ns, r.empty_ns),
                if r.passed { "pass" } else { "drop" }
            );
        }
        s.push_str("\n## Forwarding rate over veth (TCP, iperf3)\n\n");
        s.push_str("| method | clients | direction | Gbit/s | no program Gbit/s | ratio |\n|---|---:|---|---:|---:|---:|\n");
        for r in &self.forwarding {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {:.2} | {:.2} | {:.2} |",
                r.method,
                r.clients,
                r.direction,
                r.gbits,
                r.baseline_gbits,
                ratio(r.gbits, r.baseline_gbits)
            );
        }
        let mut section = "";
        for n in &self.notes {
            if n.section != section {
                section = n.section;
                let _ = write!(s, "\n## {section}\n\n");
            }
            let _ = writeln!(s, "- {}", n.text);
        }
        s
    }

    /// Two horizontal bar charts, each on its own scale: kernel cost per frame as a
    /// multiple of the empty program, and forwarding rate as a fraction of no program.
    fn svg(&self) -> String {
        let kernel: Vec<(String, f64)> = self
            .kernel
            .iter()
            .map(|r| (format!("{} ({} clients)", r.case, r.clients), ratio(r.ns, r.empty_ns)))
            .collect();
        let forwarding: Vec<(String, f64)> = self
            .forwarding
            .iter()
            .filter(|r| r.method != "no program")
            .map(|r| (format!("{} {} ({} clients)", r.method, r.direction, r.clients), ratio(r.gbits, r.baseline_gbits)))
            .collect();
        let panels = [
            ("Kernel cost per frame, x the empty program (lower is cheaper)", kernel),
            ("Forwarding rate over veth, fraction of no program (higher is faster)", forwarding),
        ];
        let (label_w, bar_w, row_h, title_h) = (470.0, 330.0, 18.0, 30.0);
        let height: f64 = panels.iter().map(|(_, bars)| title_h + row_h * bars.len() as f64 + 12.0).sum::<f64>() + 10.0;
        let mut s = format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{}\" height=\"{height}\" font-family=\"monospace\" font-size=\"11\">\n\
             <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n",
            label_w + bar_w + 60.0
        );
        let mut top = 8.0;
        for (title, bars) in &panels {
            let _ = writeln!(s, "<text x=\"8\" y=\"{:.1}\" font-size=\"13\">{}</text>", top + 14.0, escape(title));
            top += title_h;
            let max = bars.iter().map(|b| b.1).filter(|v| v.is_finite()).fold(1.0_f64, f64::max);
            let one = label_w + bar_w / max;
            let bottom = top + row_h * bars.len() as f64;
            let _ = writeln!(s, "<line x1=\"{one:.1}\" y1=\"{top:.1}\" x2=\"{one:.1}\" y2=\"{bottom:.1}\" stroke=\"#999\" stroke-dasharray=\"3,3\"/>");
            for (i, (label, value)) in bars.iter().enumerate() {
                let y = top + row_h * i as f64;
                let w = if value.is_finite() { bar_w * value / max } else { 0.0 };
                let _ = writeln!(
                    s,
                    "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>\
                     <rect x=\"{label_w}\" y=\"{y:.1}\" width=\"{w:.1}\" height=\"{:.1}\" fill=\"#3b7dd8\"/>\
                     <text x=\"{:.1}\" y=\"{:.1}\">{value:.2}</text>",
                    label_w - 6.0,
                    y + 12.0,
                    escape(label),
                    row_h - 4.0,
                    label_w + w + 4.0,
                    y + 12.0
                );
            }
            top = bottom + 12.0;
        }
        s.push_str("</svg>\n");
        s
    }

    pub fn write(&self) -> Result<()> {
        let dir = std::env::var_os("BITMESH_BENCH_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/bench"));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let md = self.markdown();
        std::fs::write(dir.join("report.md"), &md)?;
        std::fs::write(dir.join("report.svg"), self.svg())?;
        println!("{md}");
        eprintln!("bench: report written to {}/report.md and report.svg", dir.display());
        Ok(())
    }
}

fn ratio(value: f64, baseline: f64) -> f64 {
    if baseline > 0.0 {
        value / baseline
    } else {
        f64::NAN
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::Report;

    #[test]
    fn svg_has_one_panel_per_section_and_leaves_out_the_baseline_rows() {
        let mut r = Report::default();
        r.kernel("XdpUpload, paid", 10, 60.0, 6.0, true);
        r.forwarding("no program", 1, "upload", 10.0, 10.0);
        r.forwarding("bitmesh meter (tc up, tc down)", 1, "upload", 9.0, 10.0);
        let svg = r.svg();
        assert!(svg.contains("Kernel cost per frame") && svg.contains("Forwarding rate over veth"));
        assert!(svg.contains("XdpUpload, paid (10 clients)"));
        assert!(!svg.contains("no program upload"), "the baseline is the scale, not a bar");
        assert!(svg.contains(">10.00<") && svg.contains(">0.90<"));
        if let Ok(path) = std::env::var("BITMESH_SVG_OUT") {
            std::fs::write(path, &svg).ok();
        }
    }
}
