//! `ph2acf-bridge --config FILE [--check]`.

fn main() -> std::process::ExitCode {
    dcs_shared::program::main::<ph2acf::Bridge>()
}
