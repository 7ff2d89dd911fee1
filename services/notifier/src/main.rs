//! `notifier --config FILE [--check]`: alarm notifications and the watchdog.

fn main() -> std::process::ExitCode {
    dcs_shared::program::main::<notifier::Notifier>()
}
