//! `sqlx::migrate!` embeds the migration files when this crate compiles, but cargo
//! does not notice a *new* file in the directory on its own: rebuild when it changes.
fn main() {
    println!("cargo:rerun-if-changed=../migrations/postgres");
    println!("cargo:rerun-if-changed=../migrations/sqlite");
}
