//! `marta-sim --config FILE [--check]`: the simulated MARTA plant.

fn main() -> std::process::ExitCode {
    dcs_shared::program::main::<marta_sim::MartaSim>()
}
