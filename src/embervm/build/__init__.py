"""Image builds: code artifact → safe unzip → Dockerfile plan → cached steps in a build
microVM → ready check → snapshot. See docs/BUILDS.md."""
