//! Log lines that name the process: `<time> <LEVEL> supervisor[<pid>]: <message>`.
//! Workers' lines reach the supervisor's stderr through a pipe, so one stream shows
//! every generation, each line saying which process wrote it.

use std::fmt;

use tracing::{Event, Subscriber};
use tracing_subscriber::filter::Targets;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;

struct Format {
    role: &'static str,
    pid: u32,
}

/// `--log-format`: lines for people (`text`, the default) or one JSON object per line
/// for a log pipeline (`json`: `timestamp`, `level`, `target`, `message`, the event's
/// fields, and `process` and `pid` as the text line names them).
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    clap::ValueEnum,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// tracing-subscriber's JSON line, with the process's role and pid put in front.
struct JsonFormat {
    inner: tracing_subscriber::fmt::format::Format<tracing_subscriber::fmt::format::Json>,
    role: &'static str,
    pid: u32,
}

impl<S, N> FormatEvent<S, N> for JsonFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let mut line = String::new();
        self.inner
            .format_event(ctx, Writer::new(&mut line), event)?;
        // The inner line is one object: `{"timestamp":…}\n`.
        match line.strip_prefix('{') {
            Some(rest) => write!(
                writer,
                "{{\"process\":\"{}\",\"pid\":{},{rest}",
                self.role, self.pid
            ),
            None => writer.write_str(&line),
        }
    }
}

impl<S, N> FormatEvent<S, N> for Format
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        SystemTime.format_time(&mut writer)?;
        write!(
            writer,
            " {:>5} {}[{}]: ",
            event.metadata().level(),
            self.role,
            self.pid
        )?;
        ctx.field_format().format_fields(writer.by_ref(), event)?;
        writeln!(writer)
    }
}

/// Installs the global subscriber. `FLEET_LOG` sets the level, optionally per module
/// (`debug`, `info,fleet_agent=debug`); the default is `info`. (`Targets` rather than
/// `EnvFilter`: no regex engine in a supervisor that should stay small.)
pub fn init(role: &'static str, format: LogFormat) {
    let filter: Targets = std::env::var("FLEET_LOG")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| Targets::new().with_default(tracing::Level::INFO));
    let pid = std::process::id();
    let layer = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => tracing_subscriber::registry()
            .with(layer.event_format(Format { role, pid }))
            .with(filter)
            .try_init(),
        LogFormat::Json => tracing_subscriber::registry()
            .with(
                layer
                    .event_format(JsonFormat {
                        inner: tracing_subscriber::fmt::format()
                            .json()
                            .flatten_event(true)
                            .with_current_span(false)
                            .with_span_list(false),
                        role,
                        pid,
                    })
                    .fmt_fields(tracing_subscriber::fmt::format::JsonFields::new()),
            )
            .with(filter)
            .try_init(),
    };
}

/// A value a caller gave (a path, a reason, a worker's stderr line), made safe for a
/// log line: control characters (newlines included) are written as escapes, so no
/// caller can forge a line or send a terminal sequence to whoever reads the log.
pub fn escape(value: &str) -> std::borrow::Cow<'_, str> {
    if !value.chars().any(char::is_control) {
        return std::borrow::Cow::Borrowed(value);
    }
    let mut out = String::with_capacity(value.len() + 8);
    for c in value.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    std::borrow::Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::escape;

    #[test]
    fn control_characters_cannot_start_a_line() {
        assert_eq!(escape("/opt/app-v2"), "/opt/app-v2");
        assert_eq!(
            escape("x\n2026-12-04T00:00:00Z  INFO supervisor[1]: forged\u{1b}[2J"),
            "x\\n2026-12-04T00:00:00Z  INFO supervisor[1]: forged\\u{1b}[2J"
        );
    }
}
