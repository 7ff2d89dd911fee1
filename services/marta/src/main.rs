//! `marta --config FILE [--check]`: the MARTA CO2 plant driver.

fn main() -> std::process::ExitCode {
    dcs_shared::program::main::<marta::Marta>()
}
