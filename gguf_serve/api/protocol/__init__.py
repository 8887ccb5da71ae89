"""Protocol shapes (pydantic), one module per endpoint family."""
