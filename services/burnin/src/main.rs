//! `burnin --config FILE [--check]`.

fn main() -> std::process::ExitCode {
    dcs_shared::program::main::<burnin::Burnin>()
}
