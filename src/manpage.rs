//! Man pages rendered from the binaries' clap definitions with clap_mangen,
//! plus the sections clap has no field for (ENVIRONMENT, FILES, SEE ALSO).
//! Used by the hidden `vmctl generate man` and `vmmanagerd --generate-man`,
//! so `--help` and the man pages cannot drift apart.

use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// The body of one extra section.
pub enum Body {
    /// A tagged list: (term, description), as `.TP` paragraphs.
    Items(Vec<(String, String)>),
    /// Plain paragraphs, separated by blank lines.
    Text(String),
    /// Cross references such as `("busctl", "1")`.
    SeeAlso(Vec<(String, String)>),
}

impl Body {
    /// [`Body::Items`] from borrowed (term, description) pairs.
    pub fn items(list: &[(&str, &str)]) -> Body {
        Body::Items(
            list.iter()
                .map(|(term, text)| (term.to_string(), text.to_string()))
                .collect(),
        )
    }
}

/// A section clap has no field for, e.g. `("ENVIRONMENT", Body::Items(…))`.
pub struct Section {
    pub title: String,
    pub body: Body,
}

impl Section {
    pub fn new(title: &str, body: Body) -> Section {
        Section {
            title: title.to_owned(),
            body,
        }
    }
}

/// Escapes text for roff: backslashes, hyphens (so `--json` stays ASCII in
/// UTF-8 output and can be copied), and a leading `.` or `'` that would be
/// read as a request.
pub fn escape(text: &str) -> String {
    let escaped = text.replace('\\', "\\e").replace('-', "\\-");
    if escaped.starts_with('.') || escaped.starts_with('\'') {
        format!("\\&{escaped}")
    } else {
        escaped
    }
}

/// `(code, meaning)` pairs from an after_long_help text that starts with
/// "Exit status:" and lists `  CODE  meaning` lines; continuation lines are
/// joined. `None` when the text is something else.
pub fn parse_exit_status(help: &str) -> Option<Vec<(String, String)>> {
    let mut lines = help.lines();
    if !lines.next()?.trim().eq_ignore_ascii_case("exit status:") {
        return None;
    }
    let mut items: Vec<(String, String)> = Vec::new();
    for line in lines.filter(|l| !l.trim().is_empty()) {
        let trimmed = line.trim();
        let (first, rest) = trimmed
            .split_once(char::is_whitespace)
            .unwrap_or((trimmed, ""));
        match items.last_mut() {
            Some(last) if first.parse::<u8>().is_err() => {
                last.1 = format!("{} {trimmed}", last.1);
            }
            _ => items.push((first.to_owned(), rest.trim().to_owned())),
        }
    }
    Some(items)
}

fn write_section(out: &mut Vec<u8>, section: &Section) -> io::Result<()> {
    writeln!(out, ".SH {}", section.title.to_uppercase())?;
    match &section.body {
        Body::Items(items) => {
            for (term, description) in items {
                writeln!(
                    out,
                    ".TP\n\\fB{}\\fR\n{}",
                    escape(term),
                    escape(description)
                )?;
            }
        }
        Body::Text(text) => {
            for (i, paragraph) in text.split("\n\n").enumerate() {
                if i > 0 {
                    writeln!(out, ".PP")?;
                }
                for line in paragraph.lines() {
                    writeln!(out, "{}", escape(line))?;
                }
            }
        }
        Body::SeeAlso(refs) => {
            let last = refs.len().saturating_sub(1);
            for (i, (name, section)) in refs.iter().enumerate() {
                let comma = if i < last { "," } else { "" };
                writeln!(out, ".BR {} ({}){comma}", escape(name), escape(section))?;
            }
        }
    }
    Ok(())
}

/// One page: clap_mangen's NAME, SYNOPSIS, DESCRIPTION, OPTIONS and
/// SUBCOMMANDS; EXIT STATUS from the command's after_long_help (when that
/// is an "Exit status:" list); then `extra`; VERSION last.
pub fn render(cmd: clap::Command, man_section: &str, extra: &[Section]) -> io::Result<Vec<u8>> {
    let name = cmd
        .get_display_name()
        .unwrap_or_else(|| cmd.get_name())
        .to_owned();
    let exit_status = cmd
        .get_after_long_help()
        .or_else(|| cmd.get_after_help())
        .map(|h| h.to_string());
    let has_options = cmd.get_arguments().any(|a| !a.is_hide_set());
    let has_subcommands = cmd.get_subcommands().any(|s| !s.is_hide_set());
    let man = clap_mangen::Man::new(cmd)
        .title(name.to_uppercase())
        .section(man_section)
        .source(format!("vmmanager {}", env!("CARGO_PKG_VERSION")))
        .manual("VM Manager");
    let mut out = Vec::new();
    man.render_title(&mut out)?;
    man.render_name_section(&mut out)?;
    man.render_synopsis_section(&mut out)?;
    man.render_description_section(&mut out)?;
    if has_options {
        man.render_options_section(&mut out)?;
    }
    if has_subcommands {
        man.render_subcommands_section(&mut out)?;
    }
    match exit_status.as_deref().map(|h| (h, parse_exit_status(h))) {
        Some((_, Some(items))) => {
            write_section(&mut out, &Section::new("EXIT STATUS", Body::Items(items)))?
        }
        Some((text, None)) => {
            write_section(&mut out, &Section::new("NOTES", Body::Text(text.into())))?
        }
        None => {}
    }
    for section in extra {
        write_section(&mut out, section)?;
    }
    Ok(out)
}

/// Writes `render(…)` to `dir/NAME.SECTION` and returns the path.
pub fn write(
    dir: &Path,
    cmd: clap::Command,
    man_section: &str,
    extra: &[Section],
) -> io::Result<PathBuf> {
    let name = cmd
        .get_display_name()
        .unwrap_or_else(|| cmd.get_name())
        .to_owned();
    let path = dir.join(format!("{name}.{man_section}"));
    std::fs::write(&path, render(cmd, man_section, extra)?)?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_status_lines_are_parsed_with_continuations() {
        let help = "Exit status:\n  0   fine\n  1   broken,\n      badly\n  64  usage";
        let items = parse_exit_status(help).unwrap();
        assert_eq!(
            items,
            [
                ("0".into(), "fine".into()),
                ("1".into(), "broken, badly".into()),
                ("64".into(), "usage".into())
            ]
        );
        assert!(parse_exit_status("Examples:\n  foo").is_none());
    }

    #[test]
    fn roff_requests_and_hyphens_are_escaped() {
        assert_eq!(escape(".x --json \\"), "\\&.x \\-\\-json \\e");
    }
}
